"""Load and validate task data. Every problem in a file is gathered and reported together,
with the file, line and field, so a user fixes their data in one pass; nothing is dropped."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


class DataValidationError(ValueError):
    """All the problems found in one data file."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        shown = "\n".join(f"  {problem}" for problem in problems[:50])
        more = f"\n  … and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{path}: {len(problems)} problem(s) in the data:\n{shown}{more}")


def load_jsonl(
    path: str | Path,
    schema: dict[str, FieldSpec],
    field_map: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Read a JSONL file and check every line against ``schema``.

    ``field_map`` renames the user's columns to the task's field names ({their: ours}).
    Blank lines are allowed and are not examples; every other line must be a valid example.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    field_map = dict(field_map or {})
    id_schema = {"id": FieldSpec(str, description="unique example id"), **schema}
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    first_line_of_id: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as error:
                problems.append(f"{where}: not valid JSON ({error.msg} at column {error.colno})")
                continue
            if not isinstance(raw, dict):
                problems.append(f"{where}: expected a JSON object, got {type(raw).__name__}")
                continue
            record = {field_map.get(key, key): value for key, value in raw.items()}
            line_ok = True
            for name, spec in id_schema.items():
                if name not in record:
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
        raise DataValidationError(path, problems)
    if not records:
        raise DataValidationError(path, [f"{path}: the file holds no examples"])
    return records
