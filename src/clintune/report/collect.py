"""Gather the runs of a sweep: run directories on disk, or W&B runs through the public API.

Every run becomes a :class:`RunRecord`, finished or not, so the report can show a failed or
unfinished job as a gap with its reason instead of silently leaving it out.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clintune import rundir

FINISHED, FAILED, INCOMPLETE = "finished", "failed", "incomplete"
GRID_KEYS = ("model", "task", "method", "seed")
# The directory name a multirun gives a job (conf/experiment/*.yaml): a fallback identity.
RUN_NAME = re.compile(r"^(?P<model>.+)-(?P<task>[^-]+)-(?P<method>[^-]+)-s(?P<seed>-?\d+)$")


@dataclass
class RunRecord:
    """One job of the grid, whatever became of it."""

    model: str
    task: str
    method: str
    seed: int | None
    status: str  # finished | failed | incomplete
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str | None = None  # why there are no metrics (failed/incomplete), short
    path: Path | None = None  # run directory; None for a W&B run
    source: str = "dir"  # dir | wandb
    group: str | None = None
    task_config: dict[str, Any] = field(default_factory=dict)
    # From job.json or the W&B config: the task's headline metric (without "test/") and the
    # metrics that count examples (no confidence interval).
    headline: str | None = None
    count_metrics: frozenset[str] = frozenset()

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.task, self.model, self.method)

    @property
    def predictions_path(self) -> Path | None:
        if self.path is None:
            return None
        candidate = self.path / rundir.PREDICTIONS
        return candidate if candidate.is_file() else None

    def load_predictions(self) -> list[dict[str, Any]] | None:
        """The run's per-example rows, or None when it has none (a W&B run, say)."""
        path = self.predictions_path
        if path is None:
            return None
        with path.open(encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]


@dataclass
class Collection:
    runs: list[RunRecord]
    # Grid values a sweep declared (multirun.yaml) beyond those seen, so never-started jobs
    # show up as "missing" rather than vanishing from the table.
    declared: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value) if math.isfinite(float(value)) else None
    return None


def clean_metrics(raw: Mapping[str, Any]) -> dict[str, float]:
    """Numeric ``test/…``, ``compute/…`` and ``data/…`` entries; null (undefined) is dropped."""
    metrics: dict[str, float] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not key.startswith(("test/", "compute/", "data/")):
            continue
        number = _number(value)
        if number is not None:
            metrics[key] = number
    return metrics


def _seed(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _name_of(section: Any) -> str | None:
    if isinstance(section, Mapping):
        name = section.get("name")
        return str(name) if name is not None else None
    return None


def _literal(value: Any) -> str | None:
    # Hydra's saved config is unresolved; an interpolation is not a usable name.
    if value is None:
        return None
    text = str(value)
    return None if "${" in text else text


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def _read_headline(record: RunRecord, source: Mapping[str, Any]) -> None:
    headline = source.get("headline_metric")
    if isinstance(headline, str):
        record.headline = headline.removeprefix("test/")
    counts = source.get("count_metrics")
    if isinstance(counts, list):
        record.count_metrics = frozenset(str(name) for name in counts)


#: Preference metrics of the last validation, read from a run's CSV curves (a W&B run's
#: summary holds the same last values under the same names).
PREFERENCE_CURVES = ("eval/rewards/", "eval/logps/")


def _has_reference(config: Mapping[str, Any]) -> bool:
    """Whether the run's method trains against a reference model (DPO, RPO, KTO): only then
    are its rewards β·(log π − log π_ref); ORPO's and SimPO's have no reference in them."""
    method = config.get("method")
    return isinstance(method, Mapping) and bool(method.get("reference"))


def last_preference_values(run_dir: Path) -> dict[str, float]:
    """``eval/rewards/*`` and ``eval/logps/*`` at the preference stage's last validation,
    from ``logs/metrics.csv`` (Lightning's CSV logger; {} when the run has none)."""
    path = run_dir / rundir.LOGS / "metrics.csv"
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError:
        return {}
    values: dict[str, float] = {}
    for row in rows:  # later rows win: the last validation
        for name, raw in row.items():
            if name and name.startswith(PREFERENCE_CURVES) and raw not in (None, ""):
                try:
                    number = float(raw)
                except ValueError:
                    continue
                if math.isfinite(number):
                    values[name] = number
    return values


def read_run_dir(run_dir: Path) -> RunRecord:
    """A record for one run directory (one with ``.hydra/config.yaml``)."""
    try:
        config = yaml.safe_load((run_dir / rundir.HYDRA_CONFIG).read_text()) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    parsed = RUN_NAME.match(run_dir.name)
    fallback = parsed.groupdict() if parsed else {}
    model = _name_of(config.get("model")) or fallback.get("model") or "?"
    task = _name_of(config.get("task")) or fallback.get("task") or "?"
    method = _name_of(config.get("method")) or fallback.get("method") or "?"
    seed = _seed(config.get("seed", fallback.get("seed")))
    group = _literal((config.get("sweep") or {}).get("name")) or _literal(
        (config.get("logger") or {}).get("group")
    )
    task_config = config.get("task") if isinstance(config.get("task"), dict) else {}
    record = RunRecord(
        model, task, method, seed, INCOMPLETE, path=run_dir, group=group, task_config=task_config
    )

    job = _read_json(run_dir / rundir.JOB) or {}
    failure = _read_json(run_dir / rundir.FAILURE)
    metrics = _read_json(run_dir / rundir.METRICS)
    _read_headline(record, job)
    if job.get("status") == "failed" or (failure is not None and metrics is None):
        record.status = FAILED
        error = (failure or {}).get("error") or "unknown error"
        record.reason = f"failed: {error}"
    elif metrics is not None:
        # metrics.json is written last and atomically: its presence means the run finished.
        record.status = FINISHED
        curves = last_preference_values(run_dir) if _has_reference(config) else {}
        record.metrics = {**curves, **clean_metrics(metrics)}
    elif job.get("status") == "running":
        record.reason = "incomplete: still running or killed (job.json says running)"
    else:
        record.reason = "incomplete: no metrics.json"
    return record


def _declared_grid(multirun_yaml: Path) -> dict[str, list[str]]:
    """Simple comma lists a sweep declared for model/task/method/seed (sweeper params or
    command-line overrides); range() and other sweep syntax are left to what was observed."""
    try:
        config = yaml.safe_load(multirun_yaml.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    hydra = config.get("hydra") or {}
    entries: dict[str, str] = {}
    params = (hydra.get("sweeper") or {}).get("params") or {}
    if isinstance(params, Mapping):
        entries.update({str(k): str(v) for k, v in params.items()})
    for override in (hydra.get("overrides") or {}).get("task") or []:
        key, _, value = str(override).partition("=")
        entries[key.lstrip("+~")] = value
    grid: dict[str, list[str]] = {}
    for key in GRID_KEYS:
        value = entries.get(key)
        if value and re.fullmatch(r"[\w.\-]+(,[\w.\-]+)*", value):
            grid[key] = value.split(",")
    return grid


def collect_dirs(paths: Sequence[str | Path]) -> Collection:
    """Records for run directories and everything below multirun directories."""
    collection = Collection(runs=[])
    seen: set[Path] = set()
    for raw in paths:
        root = Path(raw)
        if not root.exists():
            collection.warnings.append(f"{root}: no such directory")
            continue
        if (root / rundir.HYDRA_CONFIG).is_file():
            run_dirs: Iterable[Path] = [root]
        else:
            run_dirs = sorted(p.parent.parent for p in root.rglob(rundir.HYDRA_CONFIG))
            for multirun_yaml in sorted(root.rglob("multirun.yaml")):
                for key, values in _declared_grid(multirun_yaml).items():
                    known = collection.declared.setdefault(key, [])
                    known.extend(v for v in values if v not in known)
        for run_dir in run_dirs:
            resolved = run_dir.resolve()
            # A report's own output directory or a nested copy must not count a run twice.
            if resolved in seen:
                continue
            seen.add(resolved)
            collection.runs.append(read_run_dir(run_dir))
    if not collection.runs:
        collection.warnings.append("no run directories (with .hydra/config.yaml) found")
    return collection


def parse_wandb_path(spec: str) -> tuple[str, str | None]:
    """``ENTITY/PROJECT[:GROUP]`` → (``ENTITY/PROJECT``, group)."""
    path, _, group = spec.partition(":")
    if path.count("/") != 1 or not all(path.split("/")):
        raise ValueError(f"--wandb wants ENTITY/PROJECT[:GROUP], got {spec!r}")
    return path, group or None


def _summary_dict(run: Any) -> dict[str, Any]:
    summary = getattr(run, "summary", None) or {}
    json_dict = getattr(summary, "_json_dict", None)
    if isinstance(json_dict, Mapping):
        return dict(json_dict)
    try:
        return dict(summary.items())
    except AttributeError:
        return {}


def collect_wandb(spec: str, api: Any | None = None) -> Collection:
    """Records from W&B runs (summary and config). ``api`` is a ``wandb.Api()``-like object;
    tests inject a fake one. W&B runs carry no per-example predictions."""
    path, group = parse_wandb_path(spec)
    if api is None:
        import wandb

        api = wandb.Api()
    filters = {"group": group} if group else {}
    collection = Collection(runs=[])
    for run in api.runs(path, filters=filters):
        config = dict(getattr(run, "config", None) or {})
        parsed = RUN_NAME.match(str(getattr(run, "name", "") or ""))
        fallback = parsed.groupdict() if parsed else {}
        task_config = config.get("task") if isinstance(config.get("task"), dict) else {}
        record = RunRecord(
            model=_name_of(config.get("model")) or fallback.get("model") or "?",
            task=_name_of(config.get("task")) or fallback.get("task") or "?",
            method=_name_of(config.get("method")) or fallback.get("method") or "?",
            seed=_seed(config.get("seed", fallback.get("seed"))),
            status=INCOMPLETE,
            source="wandb",
            group=getattr(run, "group", None) or group,
            task_config=task_config,
        )
        _read_headline(record, config)
        state = str(getattr(run, "state", "") or "")
        summary = _summary_dict(run)
        metrics = clean_metrics(summary)
        if _has_reference(config):
            metrics |= {
                key: number
                for key, value in summary.items()
                if isinstance(key, str)
                and key.startswith(PREFERENCE_CURVES)
                and (number := _number(value)) is not None
            }
        has_results = any(key.startswith("test/") for key in metrics)
        if state == "finished" and has_results:
            record.status, record.metrics = FINISHED, metrics
        elif state in {"failed", "crashed", "killed"} or (state == "finished" and not has_results):
            record.status = FAILED
            record.reason = f"failed: W&B state {state}" + ("" if has_results else ", no results")
        else:
            record.reason = f"incomplete: W&B state {state or 'unknown'}"
        collection.runs.append(record)
    if not collection.runs:
        collection.warnings.append(f"no W&B runs in {spec}")
    return collection
