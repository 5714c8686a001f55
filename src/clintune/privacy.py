"""Whether a run's text (inputs, outputs, targets, judge outputs, pair texts) may go to W&B.

Sensitivity belongs to the data, not to the task config: a user who reuses a shipped task
with their own files must not inherit the shipped data's "non-sensitive" flag. Text may leave
the machine only when every split the run reads is either

- a shipped data file at its shipped path, unchanged: listed with its SHA-256 in
  ``data/shipped.sha256`` (the synthetic demo data, written by ``data/generate.py``) or in
  ``data/real/shipped.sha256`` (the real public data sets whose licence and content make them
  non-sensitive, written by ``data/real/prepare.py``, which records the reason per set), or
- a hub data set whose config names it in ``task.data.hub.non_sensitive_dataset``, or
- covered by the user's own opt-in, ``task.data.contains_sensitive_text=false``, which no
  shipped config sets (a test keeps it that way).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from clintune.io import file_sha256

#: The repository's own data directory (absent in a non-editable install: then no file counts
#: as shipped, which errs on the side of keeping text local).
SHIPPED_DATA_DIR = Path(__file__).resolve().parents[2] / "data"
SHIPPED_MANIFEST = "shipped.sha256"
#: Every manifest, relative to the data directory; an entry is relative to its manifest's folder.
SHIPPED_MANIFESTS = (SHIPPED_MANIFEST, f"real/{SHIPPED_MANIFEST}")
OPT_IN_KEY = "task.data.contains_sensitive_text=false"


@dataclass(frozen=True)
class TextPolicy:
    """The decision for one run, with one reason per split that keeps text local."""

    may_log_text: bool
    sensitive_splits: dict[str, str]

    def withheld_message(self) -> str:
        reasons = "; ".join(f"{split}: {why}" for split, why in self.sensitive_splits.items())
        return (
            f"W&B gets no text from this run (inputs, outputs, targets, judge outputs, pairs): "
            f"{reasons}. Numbers, ids and configs are still logged. To allow text for your own "
            f"data, add {OPT_IN_KEY} to this run's overrides or experiment file."
        )


def read_manifest(data_dir: Path = SHIPPED_DATA_DIR) -> dict[str, str]:
    """``path relative to data_dir → sha256`` of the shipped files whose text may be logged,
    from every manifest in ``SHIPPED_MANIFESTS`` that exists."""
    entries: dict[str, str] = {}
    for name in SHIPPED_MANIFESTS:
        manifest = data_dir / name
        if not manifest.is_file():
            continue
        folder = Path(name).parent
        for line in manifest.read_text(encoding="utf-8").splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            digest, relative = line.split(maxsplit=1)
            entries[(folder / relative.strip()).as_posix()] = digest
    return entries


def shipped_file_reason(path: Path, data_dir: Path = SHIPPED_DATA_DIR) -> str | None:
    """None when ``path`` is an unchanged shipped file; otherwise why it is not."""
    resolved = path.resolve()
    try:
        relative = resolved.relative_to(data_dir.resolve()).as_posix()
    except ValueError:
        return f"{path} is not a shipped data file"
    expected = read_manifest(data_dir).get(relative)
    if expected is None:
        listed = " or ".join(str(data_dir / name) for name in SHIPPED_MANIFESTS)
        return f"{path} is not listed in {listed}"
    if not resolved.is_file() or file_sha256(resolved) != expected:
        return f"{path} differs from the shipped file"
    return None


def _split_reason(data: DictConfig | dict[str, Any], split: str, data_dir: Path) -> str | None:
    hub = data.get("hub")
    if hub:
        dataset = str(hub.get("dataset"))
        if hub.get("non_sensitive_dataset") == dataset:
            return None
        return f"hub data set {dataset} is not declared non-sensitive by its config"
    path = data.get(split)
    if not path:
        return None  # a split the task does not have cannot leak
    return shipped_file_reason(Path(str(path)), data_dir)


def text_policy(
    data: DictConfig | dict[str, Any],
    splits: list[str] | tuple[str, ...],
    data_dir: Path = SHIPPED_DATA_DIR,
) -> TextPolicy:
    """The decision for the splits a run reads, from its ``task.data`` block."""
    flag = data.get("contains_sensitive_text")
    if flag is False:
        return TextPolicy(True, {})
    if flag is True:
        return TextPolicy(False, {"all": "task.data.contains_sensitive_text=true"})
    reasons = {
        split: reason
        for split in splits
        if (reason := _split_reason(data, split, data_dir)) is not None
    }
    return TextPolicy(not reasons, reasons)
