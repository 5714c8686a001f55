"""Read offline Weights & Biases runs straight from their ``run-<id>.wandb`` files.

Why this exists: wandb >= 0.31 in offline mode (the Go ``wandb-core`` backend) writes no
``files/wandb-summary.json`` and no ``files/config.yaml``; config, summary and history exist
only in the binary transaction log ``<dir>/wandb/offline-run-<timestamp>-<id>/run-<id>.wandb``.
The Python package no longer ships a reader for it (the old ``wandb.sdk.internal.datastore``
is gone; only the Go side reads it, for ``wandb sync``), and our experiments run without a W&B
server, so collecting results means parsing that file ourselves.

Format, as written by wandb-core 0.31 (checked against real files):

* 7-byte file header: ident ``b":W&B"``, magic ``0xBEE1`` (uint16 LE, i.e. bytes ``e1 be``),
  version ``0`` (uint8).
* Then LevelDB-log framing: 32 KiB blocks of chunks; chunk header = checksum (uint32 LE),
  length (uint16 LE), type (uint8: FULL=1, FIRST=2, MIDDLE=3, LAST=4); a block tail shorter
  than a chunk header is zero padding.  The header occupies the start of the first block.
* Unlike upstream LevelDB, the checksum is plain (unmasked) zlib/IEEE CRC-32 over the type
  byte followed by the chunk data, not masked CRC-32C.
* Each reassembled record is a serialized ``wandb.proto.wandb_internal_pb2.Record``.  Values
  (config, summary, history) are JSON strings in ``value_json``, addressed either by ``key``
  or, for nested values, by the path ``nested_key`` (a logged ``wandb.Table`` becomes several
  items under ``["tab", "_type"]``, ``["tab", "path"]``, ...).
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["OfflineRun", "find_offline_runs", "read_run"]

_IDENT = b":W&B"
_MAGIC = 0xBEE1
_SUPPORTED_VERSIONS = frozenset({0})
_FILE_HEADER = struct.Struct("<4sHB")
_CHUNK_HEADER = struct.Struct("<IHB")
_BLOCK_LEN = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
# `_type` values W&B gives table references in summary/history; the data itself lives in a
# separate JSON file / artifact, so callers need to know which keys are only pointers.
_TABLE_TYPES = frozenset({"table-file", "incremental-table-file"})


@dataclass
class OfflineRun:
    """Everything we use from one run file, as plain Python values.

    ``truncated`` is True when the file ended (or became unreadable) in the middle of a
    record -- typically a run killed mid-write or a file still being written -- and
    ``truncated_at`` is the byte offset where reading stopped; all complete records before
    it are kept.  ``exit_code`` is None when no exit record was written (crashed/killed run).
    """

    path: Path
    run_id: str = ""
    name: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    project: str = ""
    entity: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    exit_code: int | None = None
    truncated: bool = False
    truncated_at: int | None = None


def find_offline_runs(root: str | Path) -> list[Path]:
    """All ``run-*.wandb`` files below ``root``, sorted so results are deterministic.

    Online run directories (``run-<ts>-<id>``) use the same file format, so they are found too.
    """
    return sorted(p for p in Path(root).rglob("run-*.wandb") if p.is_file())


def read_run(path: str | Path) -> OfflineRun:
    """Replay a run file's records into the final config/summary/history W&B would show.

    Records are applied in file order because summary and config are streams of partial
    updates and removals; only the last state is meaningful.
    """
    # Imported lazily so importing clintune does not pull in wandb's protobuf stack.
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    run = OfflineRun(path=path)
    with path.open("rb") as fh:
        _check_header(fh, path)
        reader = _ChunkReader(fh)
        for payload in reader:
            record = pb.Record()
            try:
                record.ParseFromString(payload)
            except Exception as exc:  # protobuf raises DecodeError; CRC already passed
                raise ValueError(f"{path}: undecodable record ({exc})") from exc
            try:
                _apply(run, record)
            except ValueError as exc:  # malformed value_json; name the file, not just the JSON
                raise ValueError(f"{path}: bad value in record {record.num} ({exc})") from exc
        run.truncated = reader.truncated_at is not None
        run.truncated_at = reader.truncated_at
    run.tables = _table_keys(run.summary, run.history)
    return run


def _check_header(fh: BinaryIO, path: Path) -> None:
    """Fail loudly on non-run files instead of decoding garbage into empty results."""
    raw = fh.read(_FILE_HEADER.size)
    if len(raw) < _FILE_HEADER.size:
        raise ValueError(f"{path}: not a W&B run file (only {len(raw)} bytes, no header)")
    ident, magic, version = _FILE_HEADER.unpack(raw)
    if ident != _IDENT or magic != _MAGIC:
        raise ValueError(f"{path}: not a W&B run file (bad header {raw!r})")
    if version not in _SUPPORTED_VERSIONS:
        raise ValueError(f"{path}: unsupported W&B run file version {version}")


class _ChunkReader:
    """Yield reassembled record payloads; stop (not raise) at the first damaged chunk.

    Stopping rather than raising is deliberate: the damage we expect is a torn tail from a
    killed process, and the records before it are still exactly what was logged.
    """

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self.truncated_at: int | None = None

    def __iter__(self) -> Iterator[bytes]:
        fh = self._fh
        block_start = 0
        pos = _FILE_HEADER.size  # the file header sits at the start of block 0
        block = _FILE_HEADER.size * b"\0" + fh.read(_BLOCK_LEN - _FILE_HEADER.size)
        pending: list[bytes] | None = None  # chunks of a FIRST..LAST record in progress
        pending_start = 0
        while True:
            if len(block) - pos < _CHUNK_HEADER.size:
                if len(block) < _BLOCK_LEN:  # final, partial block: this is EOF
                    if pos < len(block) or pending is not None:
                        self._stop(pending_start if pending is not None else block_start + pos)
                    return
                block_start += _BLOCK_LEN  # full block: the rest is zero padding
                block, pos = fh.read(_BLOCK_LEN), 0
                if not block:
                    if pending is not None:
                        self._stop(pending_start)
                    return
                continue
            chunk_start = block_start + pos
            checksum, length, ctype = _CHUNK_HEADER.unpack_from(block, pos)
            data = block[pos + _CHUNK_HEADER.size : pos + _CHUNK_HEADER.size + length]
            if (
                len(data) < length
                or ctype not in (_FULL, _FIRST, _MIDDLE, _LAST)
                or zlib.crc32(data, zlib.crc32(bytes((ctype,)))) != checksum
            ):
                self._stop(pending_start if pending is not None else chunk_start)
                return
            pos += _CHUNK_HEADER.size + length
            if ctype == _FULL:
                pending = None
                yield data
            elif ctype == _FIRST:
                pending, pending_start = [data], chunk_start
            elif pending is None:  # MIDDLE/LAST without FIRST: stream is inconsistent
                self._stop(chunk_start)
                return
            elif ctype == _MIDDLE:
                pending.append(data)
            else:
                pending.append(data)
                payload = b"".join(pending)
                pending = None
                yield payload

    def _stop(self, offset: int) -> None:
        self.truncated_at = offset


def _apply(run: OfflineRun, record: Any) -> None:
    """Fold one Record into the run; unknown record kinds are ignored on purpose."""
    kind = record.WhichOneof("record_type")
    if kind == "run":
        r = record.run
        # A later RunRecord (e.g. after `run.name = ...`) only carries what it sets.
        run.run_id = r.run_id or run.run_id
        run.project = r.project or run.project
        run.entity = r.entity or run.entity
        run.name = r.display_name or run.name
        run.group = r.run_group or run.group
        if r.tags:
            run.tags = list(r.tags)
        _apply_config(run.config, r.config.update, r.config.remove)
    elif kind == "config":
        _apply_config(run.config, record.config.update, record.config.remove)
    elif kind == "summary":
        for item in record.summary.update:
            _set_path(run.summary, _item_path(item), json.loads(item.value_json))
        for item in record.summary.remove:
            _del_path(run.summary, _item_path(item))
    elif kind == "history":
        row: dict[str, Any] = {}
        for item in record.history.item:
            _set_path(row, _item_path(item), json.loads(item.value_json))
        run.history.append(row)
    elif kind == "files":
        for f in record.files.files:
            if f.path not in run.files:
                run.files.append(f.path)
    elif kind == "exit":
        run.exit_code = record.exit.exit_code


def _apply_config(config: dict[str, Any], updates: Iterable[Any], removes: Iterable[Any]) -> None:
    """Apply config items, unwrapping W&B's ``{"value": v, "desc": d}`` storage form.

    The client writes plain values, but runs whose config came back from a server (resume)
    carry the wrapped form.  We unwrap only when *every* item of the record is wrapped, so a
    user's own ``{"value": ...}`` dict in an otherwise plain config is left alone.
    """
    items = [(_item_path(item), json.loads(item.value_json)) for item in updates]
    if items and all(_is_wrapped(value) for _, value in items):
        items = [(key, value["value"]) for key, value in items]
    for key, value in items:
        _set_path(config, key, value)
    for item in removes:
        _del_path(config, _item_path(item))


def _is_wrapped(value: Any) -> bool:
    return isinstance(value, dict) and "value" in value and set(value) <= {"value", "desc"}


def _item_path(item: Any) -> list[str]:
    """``nested_key`` wins when present: it is how wandb-core addresses flattened dicts."""
    return list(item.nested_key) or [item.key]


def _set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        child = target.get(key)
        if not isinstance(child, dict):
            child = target[key] = {}
        target = child
    target[path[-1]] = value


def _del_path(target: dict[str, Any], path: list[str]) -> None:
    for key in path[:-1]:
        child = target.get(key)
        if not isinstance(child, dict):
            return
        target = child
    target.pop(path[-1], None)


def _table_keys(summary: dict[str, Any], history: list[dict[str, Any]]) -> list[str]:
    """Keys (nested ones joined with ".") whose value is a reference to a W&B Table file."""
    found: dict[str, None] = {}  # ordered set: first appearance order, no duplicates
    for source in (summary, *history):
        for key in _walk_tables(source, ""):
            found[key] = None
    return list(found)


def _walk_tables(obj: dict[str, Any], prefix: str) -> Iterator[str]:
    for key, value in obj.items():
        if not isinstance(value, dict):
            continue
        name = f"{prefix}{key}"
        if value.get("_type") in _TABLE_TYPES:
            yield name
        else:
            yield from _walk_tables(value, f"{name}.")
