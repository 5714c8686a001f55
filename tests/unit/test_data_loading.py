"""Bad data fails with the file, the line, the field and what was expected, all at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clintune.tasks.data import DataValidationError, FieldSpec, load_jsonl

SCHEMA = {"text": FieldSpec(str), "label": FieldSpec(str, allowed=("yes", "no"))}


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_valid_file_loads_with_field_mapping(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "d.jsonl",
        [
            json.dumps({"id": "1", "note": "dysuria", "y": "yes"}),
            "",
            json.dumps({"id": "2", "note": "x", "y": "no"}),
        ],
    )
    records = load_jsonl(path, SCHEMA, {"note": "text", "y": "label"})
    assert [r["text"] for r in records] == ["dysuria", "x"]


def test_every_problem_is_reported_with_its_line_and_field(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "bad.jsonl",
        [
            json.dumps({"id": "1", "text": "ok", "label": "yes"}),
            '{"id": "2", "text": "broken',  # line 2: malformed JSON
            json.dumps({"id": "3", "label": "no"}),  # line 3: missing text
            json.dumps({"id": "4", "text": 5, "label": "no"}),  # line 4: mistyped
            json.dumps({"id": "5", "text": "a", "label": "maybe"}),  # line 5: not in label set
            json.dumps({"id": "6", "text": "   ", "label": "no"}),  # line 6: empty text
            json.dumps({"id": "1", "text": "b", "label": "no"}),  # line 7: duplicate id
            json.dumps(["not", "an", "object"]),  # line 8
        ],
    )
    with pytest.raises(DataValidationError) as caught:
        load_jsonl(path, SCHEMA)
    message = str(caught.value)
    expected = [
        f"{path}:2: not valid JSON",
        f"{path}:3: field 'text': missing",
        f"{path}:4: field 'text': expected string, got int",
        f"{path}:5: field 'label': expected one of ['yes', 'no'], got 'maybe'",
        f"{path}:6: field 'text': expected non-empty string",
        f"{path}:7: field 'id': duplicate id '1' (first on line 1)",
        f"{path}:8: expected a JSON object, got list",
    ]
    for fragment in expected:
        assert fragment in message
    assert len(caught.value.problems) == len(expected)


def test_missing_mapped_field_names_the_users_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", [json.dumps({"id": "1", "y": "yes"})])
    with pytest.raises(DataValidationError, match=r"field 'text' \(mapped from 'note'\): missing"):
        load_jsonl(path, SCHEMA, {"note": "text", "y": "label"})


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_jsonl(tmp_path / "nope.jsonl", SCHEMA)
    with pytest.raises(DataValidationError, match="holds no examples"):
        load_jsonl(_write(tmp_path / "empty.jsonl", [""]), SCHEMA)


def test_a_rejected_field_is_validated_in_local_files(tmp_path: Path) -> None:
    from helpers import compose_train
    from hydra.utils import instantiate

    path = _write(
        tmp_path / "t.jsonl",
        [
            json.dumps({"id": "1", "text": "a", "label": "yes", "rejected": "no"}),
            json.dumps({"id": "2", "text": "b", "label": "no", "rejected": 3}),
        ],
    )
    task = instantiate(
        compose_train([f"task.data.test={path}"], tmp_path).task, _convert_="partial"
    )
    with pytest.raises(DataValidationError, match=rf"{path}:2: field 'rejected': expected string"):
        task.load_split("test")
