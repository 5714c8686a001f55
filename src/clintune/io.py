"""Crash-safe file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write beside, then rename: a crash leaves the old file or none, never half of one."""
    _atomic_write_text(Path(path), data)


def _atomic_write_text(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide results from the team
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8") if isinstance(text, str) else text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _finite_or_none(value: Any) -> Any:
    # Strict JSON has no NaN: an undefined metric (no graded examples, say) is written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path: str | Path, payload: dict[str, Any]) -> None:
    clean = {key: _finite_or_none(value) for key, value in payload.items()}
    text = json.dumps(clean, indent=2, sort_keys=True, allow_nan=False)
    _atomic_write_text(Path(path), text + "\n")


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    _atomic_write_text(
        Path(path), "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    )
