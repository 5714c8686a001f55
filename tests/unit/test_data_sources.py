"""User data: CSV files, hub-style datasets, field and value maps, and the leakage check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REPO, compose_train, run_script
from hydra.utils import instantiate

from clintune.pipeline import LeakageError, check_leakage
from clintune.tasks.data import DataValidationError, find_leakage


def _task(overrides: list[str], cache: Path):
    return instantiate(compose_train(overrides, cache).task, _convert_="partial")


def test_csv_with_field_map_and_errors_by_line(tmp_path: Path, cache_dir: Path) -> None:
    good = tmp_path / "notes.csv"
    good.write_text('note_id,note,verdict\nn1,"Dysuria, nitrite positive",yes\nn2,Cough only,no\n')
    task = _task(
        [
            f"task.data.test={good}",
            "task.data.field_map={note_id: id, note: text, verdict: label}",
        ],
        cache_dir,
    )
    records = task.load_split("test")
    assert [(r["id"], r["text"], r["label"]) for r in records] == [
        ("n1", "Dysuria, nitrite positive", "yes"),
        ("n2", "Cough only", "no"),
    ]
    bad = tmp_path / "bad.csv"
    bad.write_text("note_id,note,verdict\nn1,ok,yes\nn2,,no\nn3,text,perhaps\nn4,a,no,extra\n")
    task.data.test = str(bad)
    with pytest.raises(DataValidationError) as caught:
        task.load_split("test")
    message = str(caught.value)
    assert f"{bad}:3: field 'text': expected non-empty string" in message
    assert f"{bad}:4: field 'label': expected one of ['yes', 'no'], got 'perhaps'" in message
    assert f"{bad}:5: 1 more cell(s) than the header has" in message


def test_reasoning_csv_decodes_json_cells_and_checks_answer_text(tmp_path: Path, cache_dir) -> None:
    path = tmp_path / "mcq.csv"
    options = json.dumps({"A": "Asthma", "B": "Pneumonia", "C": "Gout", "D": "Migraine"})
    rows = [
        ["q1", "Fever and crackles.", options, "B", "Pneumonia", "[]"],
        ["q2", "Wheeze.", options, "A", "Gout", "[]"],
    ]
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "question", "options", "answer", "answer_text", "synonyms"])
        writer.writerows(rows)
    task = _task(["task=reasoning", f"task.data.test={path}"], cache_dir)
    with pytest.raises(
        DataValidationError, match=rf"{path}:3: field 'answer_text': expected the text of option A"
    ):
        task.load_split("test")


def test_hub_style_dataset_with_value_map(tmp_path: Path, cache_dir: Path) -> None:
    import datasets

    rows = {
        "train": [
            {
                "input_text": "Burning when I pee and going often",
                "output_text": "urinary tract infection",
            },
            {"input_text": "Itchy red rash on my arms", "output_text": "psoriasis"},
        ],
        "test": [
            {"input_text": "I pee often and it stings", "output_text": "urinary tract infection"}
        ],
    }
    saved = tmp_path / "symptoms"
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in rows.items()}).save_to_disk(
        saved
    )
    task = _task(
        [
            "task=symptom_uti_hub",
            f"task.data.hub.dataset={saved}",
            "task.data.hub.splits={train: train, val: train, test: test}",
        ],
        cache_dir,
    )
    train = task.load_split("train")
    assert [(r["id"], r["label"]) for r in train] == [("train-0", "yes"), ("train-1", "no")]
    assert task.load_split("test")[0]["text"] == "I pee often and it stings"


def test_find_leakage_by_id_and_by_normalised_text() -> None:
    train = [{"id": "a", "text": "Dysuria  and Nitrite +"}, {"id": "b", "text": "cough"}]
    test = [
        {"id": "a", "text": "something new"},  # same id
        {"id": "x", "text": "dysuria and nitrite +"},  # same text after normalising
        {"id": "y", "text": "headache"},
    ]
    assert find_leakage(train, test, lambda e: e["text"]) == ["a", "x"]


def test_leakage_fails_loudly_unless_downgraded(cache_dir: Path) -> None:
    task = _task([], cache_dir)
    splits = {"train": [{"id": "t1", "text": "Dysuria.", "label": "yes"}], "val": []}
    splits["test"] = [{"id": "z9", "text": " dysuria. ", "label": "yes"}]
    with pytest.raises(LeakageError, match="1 test example"):
        check_leakage(task, splits)
    task.data.allow_leakage = True
    assert check_leakage(task, splits) == ["z9"]


@pytest.mark.parametrize(
    ("val_example", "leaked_id"),
    [
        ({"id": "t2", "text": "Cough, urinalysis normal.", "label": "no"}, "t2"),  # same id
        ({"id": "v1", "text": "Nitrite POSITIVE,  dysuria", "label": "yes"}, "t3"),  # same text
    ],
    ids=["same-id", "same-normalised-text"],
)
def test_leakage_into_val_only_is_caught(
    cache_dir: Path, val_example: dict[str, str], leaked_id: str
) -> None:
    # Train is clean: only val shares the test example, so the "or val" half must catch it.
    task = _task([], cache_dir)
    splits = {
        "train": [{"id": "t1", "text": "Dysuria.", "label": "yes"}],
        "val": [val_example],
        "test": [
            {"id": "t2", "text": "Flank pain only.", "label": "no"},
            {"id": "t3", "text": "nitrite positive, dysuria", "label": "yes"},
        ],
    }
    assert find_leakage(splits["train"], splits["test"], task.input_text) == []
    with pytest.raises(LeakageError, match="1 test example"):
        check_leakage(task, splits)
    task.data.allow_leakage = True
    assert check_leakage(task, splits) == [leaked_id]


@pytest.mark.slow
def test_leakage_through_train_py(tmp_path: Path, run_env) -> None:
    data = REPO / "data" / "classification"
    test_lines = (data / "test.jsonl").read_text().splitlines()[:10]
    leaked = json.loads((data / "train.jsonl").read_text().splitlines()[0])
    leaked["id"] = "copied-from-train"
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("\n".join([*test_lines, json.dumps(leaked)]) + "\n")
    common = [f"task.data.test={test_file}", "logger=none", "eval.progress_bar=false"]
    refused = run_script(
        "train.py", [*common, f"hydra.run.dir={tmp_path / 'a'}"], run_env, check=False
    )
    assert refused.returncode != 0
    assert "1 test example(s) of task 'classification' also occur in train/val" in refused.stderr
    assert not (tmp_path / "a" / "metrics.json").exists()

    run_dir = tmp_path / "b"
    run_script(
        "train.py",
        [
            *common,
            "task.data.allow_leakage=true",
            "method.train.max_steps=2",
            f"hydra.run.dir={run_dir}",
        ],
        run_env,
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["data/leaked_test_examples"] == 1
    assert metrics["test/n"] == 11
