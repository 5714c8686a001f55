"""Crash-safe file writes (a reader sees the old file or the new one, never half of one),
build-once directories, and the content hashes that key caches and jobs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from filelock import FileLock


def content_hash(payload: Any, length: int = 20) -> str:
    """The key of everything that decides a result (a job, a stage, a reference pass, a
    merge): SHA-256 of its canonical JSON, cut to ``length`` hex digits."""
    canonical = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def link_or_copy(source: str, destination: str) -> None:
    """``shutil.copytree``'s copy function for immutable files: a hard link where possible."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write beside, then rename: a crash leaves the old file or none, never half of one."""
    with atomic_open(path) as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file handle whose contents replace ``path`` only when the block ends without
    an error: written to a temporary file beside it, synced, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide results from the team
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def build_directory_once(final_dir: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """``final_dir``, built by ``build(staging)`` unless a complete one (holding ``marker``,
    which ``build`` writes last) exists. Builders serialise on a file lock beside it, build in
    a private staging directory and publish it with one rename, so a reader never sees a half
    build and a killed builder leaves only a staging directory the next build ignores."""
    if (final_dir / marker).is_file():
        return final_dir
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final_dir.parent / f"{final_dir.name}.lock")):
        if (final_dir / marker).is_file():
            return final_dir
        staging = Path(
            tempfile.mkdtemp(prefix=f".{final_dir.name}.building-", dir=final_dir.parent)
        )
        try:
            build(staging)
            if final_dir.exists():  # an incomplete leftover: never reused
                shutil.rmtree(final_dir)
            os.replace(staging, final_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final_dir


def _finite_or_none(value: Any) -> Any:
    # Strict JSON has no NaN: an undefined metric (no graded examples, say) is written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path: str | Path, payload: dict[str, Any]) -> None:
    clean = {key: _finite_or_none(value) for key, value in payload.items()}
    text = json.dumps(clean, indent=2, sort_keys=True, allow_nan=False)
    write_atomic(path, text + "\n")


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
