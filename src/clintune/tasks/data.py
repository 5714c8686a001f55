"""Load and validate task data. Every problem in a file is gathered and reported together,
with the file, line and field, so a user fixes their data in one pass; nothing is dropped."""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clintune.errors import UserError

RecordCheck = Callable[[dict[str, Any]], list[str]]

_TYPE_NAMES = {str: "string", int: "integer", float: "number", list: "list", dict: "object"}


@dataclass(frozen=True)
class FieldSpec:
    """One field of a task's JSONL schema."""

    type: type
    allowed: tuple[str, ...] | None = None
    required: bool = True
    nonempty: bool = True
    description: str = ""

    def check(self, value: Any) -> str | None:
        """The reason ``value`` violates the spec, or None when it is valid."""
        expected = _TYPE_NAMES.get(self.type, self.type.__name__)
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            return None
        if not isinstance(value, self.type) or isinstance(value, bool):
            return f"expected {expected}, got {type(value).__name__} {value!r:.60}"
        if self.allowed is not None and value not in self.allowed:
            return f"expected one of {list(self.allowed)}, got {value!r:.60}"
        if (
            self.nonempty
            and isinstance(value, str | list | dict)
            and not (value.strip() if isinstance(value, str) else value)
        ):
            return f"expected non-empty {expected}"
        return None


class DataValidationError(UserError, ValueError):
    """All the problems found in one data file."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        shown = "\n".join(f"  {problem}" for problem in problems[:50])
        more = f"\n  … and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{path}: {len(problems)} problem(s) in the data:\n{shown}{more}")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue  # blank lines separate nothing and are not examples
            try:
                yield line_number, json.loads(line), None
            except json.JSONDecodeError as error:
                yield line_number, None, f"not valid JSON ({error.msg} at column {error.colno})"


def _csv_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            if None in row:
                yield reader.line_num, None, f"{len(row[None])} more cell(s) than the header has"
                continue
            yield reader.line_num, dict(row), None


def _decode_csv_cells(record: dict[str, Any], schema: dict[str, FieldSpec]) -> dict[str, Any]:
    # CSV cells are text; lists and objects (options, synonyms) are written as JSON in a cell.
    decoded = dict(record)
    for name, spec in schema.items():
        value = decoded.get(name)
        if isinstance(value, str) and spec.type in (list, dict, int, float):
            # Undecodable text is left as it is, so the type check reports it.
            with contextlib.suppress(json.JSONDecodeError):
                decoded[name] = json.loads(value) if value.strip() else value
    return decoded


def validate_rows(
    rows: Iterable[tuple[int, Any, str | None]],
    source: str,
    schema: dict[str, FieldSpec],
    field_map: dict[str, str] | None = None,
    value_map: dict[str, dict[str, Any]] | None = None,
    record_check: RecordCheck | None = None,
    *,
    cells_are_text: bool = False,
) -> list[dict[str, Any]]:
    """Check every row against ``schema`` and gather every problem before failing.

    ``field_map`` renames the user's columns to the task's fields ({theirs: ours});
    ``value_map`` rewrites a field's values ({field: {their_value: our_value, "*": default}}),
    which reduces, say, a diagnosis column to a yes/no rule.
    """
    field_map = dict(field_map or {})
    value_map = {name: dict(mapping) for name, mapping in (value_map or {}).items()}
    id_schema = {"id": FieldSpec(str, description="unique example id"), **schema}
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    first_line_of_id: dict[str, int] = {}
    for line_number, raw, parse_error in rows:
        where = f"{source}:{line_number}"
        if parse_error is not None:
            problems.append(f"{where}: {parse_error}")
            continue
        if not isinstance(raw, dict):
            problems.append(f"{where}: expected a JSON object, got {type(raw).__name__}")
            continue
        record = {field_map.get(key, key): value for key, value in raw.items()}
        if isinstance(record.get("id"), int) and not isinstance(record.get("id"), bool):
            record["id"] = str(record["id"])  # hub datasets often number their rows
        if cells_are_text:
            record = _decode_csv_cells(record, id_schema)
        for name, mapping in value_map.items():
            if name in record:
                key = str(record[name])
                record[name] = mapping.get(key, mapping.get("*", record[name]))
        line_ok = True
        for name, spec in id_schema.items():
            if name not in record or (cells_are_text and record[name] == "" and not spec.required):
                if name in record:
                    del record[name]
                if spec.required:
                    mapped = [theirs for theirs, ours in field_map.items() if ours == name]
                    hint = f" (mapped from '{mapped[0]}')" if mapped else ""
                    problems.append(f"{where}: field '{name}'{hint}: missing")
                    line_ok = False
                continue
            reason = spec.check(record[name])
            if reason:
                problems.append(f"{where}: field '{name}': {reason}")
                line_ok = False
        if line_ok and record_check is not None:
            for problem in record_check(record):
                problems.append(f"{where}: {problem}")
                line_ok = False
        example_id = record.get("id")
        if isinstance(example_id, str):
            if example_id in first_line_of_id:
                problems.append(
                    f"{where}: field 'id': duplicate id {example_id!r} "
                    f"(first on line {first_line_of_id[example_id]})"
                )
                line_ok = False
            else:
                first_line_of_id[example_id] = line_number
        if line_ok:
            records.append(record)
    if problems:
        raise DataValidationError(Path(source), problems)
    if not records:
        raise DataValidationError(Path(source), [f"{source}: holds no examples"])
    return records


def load_records(
    path: str | Path,
    schema: dict[str, FieldSpec],
    field_map: dict[str, str] | None = None,
    value_map: dict[str, dict[str, Any]] | None = None,
    record_check: RecordCheck | None = None,
) -> list[dict[str, Any]]:
    """Read a JSONL (or CSV, by suffix) file and validate every example."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    is_csv = path.suffix.lower() in {".csv", ".tsv"}
    rows = _csv_rows(path) if is_csv else _jsonl_rows(path)
    return validate_rows(
        rows, str(path), schema, field_map, value_map, record_check, cells_are_text=is_csv
    )


def load_jsonl(
    path: str | Path,
    schema: dict[str, FieldSpec],
    field_map: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    return load_records(path, schema, field_map)


def load_hub_split(
    dataset: str,
    split: str,
    schema: dict[str, FieldSpec],
    field_map: dict[str, str] | None = None,
    value_map: dict[str, dict[str, Any]] | None = None,
    *,
    subset: str | None = None,
    id_field: str | None = None,
    record_check: RecordCheck | None = None,
) -> list[dict[str, Any]]:
    """A split of a Hugging Face dataset (hub id or a local ``save_to_disk`` directory),
    validated exactly like a local file; a dataset without ids gets ``<split>-<row>``."""
    import datasets

    if Path(dataset).is_dir():
        loaded = datasets.load_from_disk(dataset)
        table = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    else:
        table = datasets.load_dataset(dataset, subset, split=split)
    source = f"{dataset}[{split}]"

    def rows() -> Iterator[tuple[int, Any, str | None]]:
        for row_number, row in enumerate(table, start=1):
            row = dict(row)
            if id_field is None and "id" not in row:
                row["id"] = f"{split}-{row_number - 1}"
            yield row_number, row, None

    mapping = dict(field_map or {})
    if id_field:
        mapping[id_field] = "id"
    return validate_rows(rows(), source, schema, mapping, value_map, record_check)


def normalise_text(text: str) -> str:
    return " ".join(text.lower().split())


def find_leakage(
    train: list[dict[str, Any]], test: list[dict[str, Any]], text_of: Callable[[dict], str]
) -> list[str]:
    """Ids of test examples that also occur in ``train`` by id or by normalised input text."""
    train_ids = {example["id"] for example in train}
    train_texts = {normalise_text(text_of(example)) for example in train}
    return [
        example["id"]
        for example in test
        if example["id"] in train_ids or normalise_text(text_of(example)) in train_texts
    ]
