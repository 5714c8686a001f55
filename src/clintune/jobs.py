"""One job of a (multi)run: skip it when an identical job already finished (resuming a
sweep), and record a failure without stopping the sweep's other jobs."""

from __future__ import annotations

import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from clintune import rundir
from clintune.errors import INTERRUPTED_EXIT_CODE, TrainingInterrupted
from clintune.io import content_hash, write_json_atomic
from clintune.settings import settings_from
from clintune.tasks.base import headline_record

log = logging.getLogger(__name__)

# What decides a job's results; paths, logging and progress bars do not.
RESULT_KEYS = ("model", "task", "method", "trainer", "seed", "eval", "stages")


def config_hash(cfg: DictConfig) -> str:
    payload = {
        key: OmegaConf.to_container(cfg[key], resolve=True)
        if isinstance(cfg.get(key), DictConfig)
        else cfg.get(key)
        for key in RESULT_KEYS
    }
    if isinstance(payload.get("eval"), dict):
        payload["eval"].pop("progress_bar", None)
    return content_hash(payload, 16)


def finished_job(run_dir: Path, cfg: DictConfig) -> bool:
    """True when ``run_dir`` holds a finished run of this very configuration."""
    job_file, metrics = run_dir / rundir.JOB, run_dir / rundir.METRICS
    if not (job_file.is_file() and metrics.is_file()):
        return False
    job = json.loads(job_file.read_text())
    return job.get("status") == "finished" and job.get("config_hash") == config_hash(cfg)


def run_job(cfg: DictConfig, run_dir: Path, *, multirun: bool, job: Any) -> dict[str, Any] | None:
    """Run ``job(cfg, run_dir)`` with the bookkeeping a sweep needs.

    In a multirun a failure is written to ``failure.json`` (and ``job.json``) and the sweep
    goes on; a single run re-raises so its exit code says it failed.
    """
    sweep = settings_from(cfg).sweep
    resume = sweep is not None and sweep.resume
    if multirun and resume and finished_job(run_dir, cfg):
        print(f"Skipping {run_dir.name}: already finished (sweep.resume=false reruns it)")
        return json.loads((run_dir / rundir.METRICS).read_text())
    started = time.time()
    record = {
        "config_hash": config_hash(cfg),
        "status": "running",
        "started": started,
        **headline_record(cfg),
    }
    write_json_atomic(run_dir / rundir.JOB, record)
    (run_dir / rundir.FAILURE).unlink(missing_ok=True)
    try:
        metrics = job(cfg, run_dir)
    except TrainingInterrupted as interrupted:
        write_json_atomic(
            run_dir / rundir.JOB,
            {**record, "status": "interrupted", "ended": time.time(), "reason": str(interrupted)},
        )
        print(f"Job {run_dir.name} interrupted: {interrupted}")
        # Imported here: Hydra loads this module (SweepSummary) before a config is checked,
        # and the config check must not wait for Lightning's import.
        from clintune.checkpointing import requeue_with_submitit

        if not requeue_with_submitit():
            raise SystemExit(INTERRUPTED_EXIT_CODE) from interrupted
        return None
    except Exception as error:
        failure = {
            "error": type(error).__name__,
            "message": str(error)[:4000],
            "traceback": traceback.format_exc()[-8000:],
        }
        write_json_atomic(run_dir / rundir.FAILURE, failure)
        write_json_atomic(
            run_dir / rundir.JOB, {**record, "status": "failed", "ended": time.time()}
        )
        if not multirun:
            raise
        log.error("Job %s failed: %s: %s", run_dir.name, failure["error"], failure["message"])
        reason = f"{failure['error']}: {failure['message'][:200]}"
        print(f"Job {run_dir.name} FAILED ({reason}); the sweep goes on")
        return None
    write_json_atomic(run_dir / rundir.JOB, {**record, "status": "finished", "ended": time.time()})
    return metrics


class SweepSummary(Callback):
    """At the end of a multirun: how many jobs finished, were skipped or failed (and why),
    written to ``<sweep dir>/sweep_summary.json`` and printed."""

    def __init__(self) -> None:
        self._started = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        summary: dict[str, Any] = {"finished": [], "failed": {}, "unfinished": []}
        starts: list[float] = []
        for job_file in sorted(sweep_dir.glob(f"*/{rundir.JOB}")):
            run_dir = job_file.parent
            job = json.loads(job_file.read_text())
            status = job.get("status")
            if job.get("started", 0) >= self._started:
                starts.append(job["started"])
            if status == "finished":
                summary["finished"].append(run_dir.name)
            elif status == "failed" and (run_dir / rundir.FAILURE).is_file():
                failure = json.loads((run_dir / rundir.FAILURE).read_text())
                summary["failed"][run_dir.name] = f"{failure['error']}: {failure['message'][:300]}"
            else:
                summary["unfinished"].append(run_dir.name)
        if not sweep_dir.is_dir():
            return
        summary["wall_seconds"] = time.time() - self._started
        summary["jobs_run"] = len(starts)
        write_json_atomic(sweep_dir / "sweep_summary.json", summary)
        print(
            f"\nSweep {sweep_dir}: {len(summary['finished'])} finished, "
            f"{len(summary['failed'])} failed, {len(summary['unfinished'])} unfinished; "
            f"{len(starts)} job(s) run in {summary['wall_seconds'] / 60:.1f} min"
        )
        for name, reason in summary["failed"].items():
            print(f"  FAILED {name}: {reason}")
