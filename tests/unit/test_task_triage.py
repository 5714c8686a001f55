"""Triage: the two-part parser, the per-part metrics against hand-computed values, the schema,
and the shipped data through the real Hydra config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
import pytest
import yaml
from helpers import compose_train, run_script

from clintune.tasks.data import DataValidationError
from clintune.tasks.triage import TriageTask, parse_triage
from clintune.tokenization import completion_text

# One worker runs this module under -n: its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("task_triage")

PROVIDERS = ["physician", "nurse", "pharmacist", "admin"]
URGENCIES = ["routine", "soon", "urgent", "emergent"]


def _task(data: dict[str, Any] | None = None) -> TriageTask:
    return TriageTask(
        name="triage",
        data=data or {},
        instruction="Route it.",
        provider_labels=PROVIDERS,
        urgency_labels=URGENCIES,
    )


@pytest.fixture(scope="module")
def task(cache_dir: Path) -> TriageTask:
    cfg = compose_train(["task=triage"], cache_dir)
    return hydra.utils.instantiate(cfg.task, _convert_="partial")


def _both(provider: str | None, urgency: str | None) -> dict[str, str | None]:
    return {"provider": provider, "urgency": urgency}


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        # well formed
        ("provider: nurse; urgency: soon", _both("nurse", "soon")),
        ("provider: physician; urgency: emergent", _both("physician", "emergent")),
        # case, punctuation, separators, newlines, decoration
        ("Provider = Nurse, Urgency = URGENT", _both("nurse", "urgent")),
        ("PROVIDER: Admin | URGENCY: Routine.", _both("admin", "routine")),
        ("provider:nurse|urgency:soon", _both("nurse", "soon")),
        ("**Provider:** the pharmacist\n**Urgency:** routine.", _both("pharmacist", "routine")),
        ("Provider - Physician / Urgency - Emergent", _both("physician", "emergent")),
        ("provider is the nurse and urgency level is soon", _both("nurse", "soon")),
        # swapped order, extra words, no keys at all
        ("urgency: emergent\nprovider: physician", _both("physician", "emergent")),
        (
            "Sure! Provider: pharmacist; urgency: soon. Hope that helps.",
            _both("pharmacist", "soon"),
        ),
        ("nurse, soon", _both("nurse", "soon")),
        ("Route to the nurse. Priority: soon", _both("nurse", "soon")),
        # the first keyed answer wins over a repetition after it
        (
            "provider: nurse; urgency: soon provider: physician; urgency: urgent",
            _both("nurse", "soon"),
        ),
        # one part missing, garbage, negated or hedged: that part alone is None
        ("provider: nurse", _both("nurse", None)),
        ("provider: banana; urgency: soon", _both(None, "soon")),
        ("urgency: not urgent; provider: admin", _both("admin", None)),
        ("provider: admin; urgency: non-urgent", _both("admin", None)),
        ("provider: nurse or physician; urgency: soon", _both(None, "soon")),
        ("physician or nurse, urgent", _both(None, "urgent")),
        ("not the nurse; urgency: routine", _both(None, "routine")),
        # nothing readable at all
        ("", None),
        ("garbage", None),
        ("provider: ???; urgency: ???", None),
        ("the nursery is urgently needed", None),  # labels inside words do not count
    ],
)
def test_parse_triage(output: str, expected: dict[str, str | None] | None) -> None:
    assert parse_triage(output, PROVIDERS, URGENCIES) == expected


def test_metrics_hand_computed() -> None:
    task = _task()
    golds = [
        _both("physician", "urgent"),
        _both("nurse", "soon"),
        _both("pharmacist", "soon"),
        _both("admin", "routine"),
        _both("physician", "emergent"),
    ]
    predictions = [
        _both("physician", "urgent"),  # both right
        _both("nurse", "routine"),  # provider right
        _both("physician", "soon"),  # urgency right
        None,  # unparseable: both wrong
        _both("physician", None),  # provider right, urgency unreadable
    ]
    metrics, scores = task.score([{}] * 5, predictions, golds)
    assert [s["provider_correct"] for s in scores] == [True, True, False, False, True]
    assert [s["urgency_correct"] for s in scores] == [True, False, True, False, False]
    assert [s["correct"] for s in scores] == [True, False, False, False, False]
    # provider: physician tp=2 fp=1 fn=0 → P=2/3 R=1 F1=4/5; nurse tp=1 → F1=1;
    # pharmacist and admin tp=0 → F1=0; macro = (0.8+1+0+0)/4 = 0.45; accuracy 3/5.
    assert metrics["provider_f1_class_physician"] == pytest.approx(0.8)
    assert metrics["provider_f1_class_nurse"] == pytest.approx(1.0)
    assert metrics["provider_f1_class_pharmacist"] == pytest.approx(0.0)
    assert metrics["provider_f1_class_admin"] == pytest.approx(0.0)
    assert metrics["provider_f1_macro"] == pytest.approx(0.45)
    assert metrics["provider_accuracy"] == pytest.approx(0.6)
    # urgency: routine tp=0 fp=1 fn=1 → 0; soon tp=1 fp=0 fn=1 → P=1 R=1/2 F1=2/3;
    # urgent tp=1 → 1; emergent tp=0 → 0; macro = (0+2/3+1+0)/4 = 5/12; accuracy 2/5.
    assert metrics["urgency_f1_class_routine"] == pytest.approx(0.0)
    assert metrics["urgency_f1_class_soon"] == pytest.approx(2 / 3)
    assert metrics["urgency_f1_class_urgent"] == pytest.approx(1.0)
    assert metrics["urgency_f1_class_emergent"] == pytest.approx(0.0)
    assert metrics["urgency_f1_macro"] == pytest.approx(5 / 12)
    assert metrics["urgency_accuracy"] == pytest.approx(0.4)
    assert metrics["exact_match"] == pytest.approx(0.2)
    assert task.headline_metric in metrics


def test_labels_must_be_distinct_and_disjoint() -> None:
    with pytest.raises(ValueError, match="two distinct provider labels"):
        TriageTask(
            name="t", data={}, instruction="x", provider_labels=["a"], urgency_labels=URGENCIES
        )
    with pytest.raises(ValueError, match="in both sets"):
        TriageTask(
            name="t",
            data={},
            instruction="x",
            provider_labels=["nurse", "soon"],
            urgency_labels=URGENCIES,
        )


def test_schema_rejects_bad_labels_with_their_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    rows = [
        {"id": "1", "text": "Refill please.", "provider": "pharmacist", "urgency": "routine"},
        {"id": "2", "text": "Chest pain.", "provider": "surgeon", "urgency": "emergent"},
        {"id": "3", "text": "Bill.", "provider": "admin", "urgency": "whenever"},
        {"id": "4", "text": "Hi.", "provider": "nurse"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    with pytest.raises(DataValidationError) as caught:
        _task({"test": str(path)}).load_split("test")
    message = str(caught.value)
    assert f"{path}:2: field 'provider': expected one of {PROVIDERS}, got 'surgeon'" in message
    assert f"{path}:3: field 'urgency': expected one of {URGENCIES}, got 'whenever'" in message
    assert f"{path}:4: field 'urgency': missing" in message
    assert len(caught.value.problems) == 3


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_shipped_split_loads_and_targets_round_trip(task: TriageTask, split: str) -> None:
    examples = task.load_split(split)
    assert task.name == "triage" and task.headline_metric == "provider_f1_macro"
    for example in examples:
        target = task.target_text(example)
        assert target == f"provider: {example['provider']}; urgency: {example['urgency']}"
        assert task.parse(target) == task.gold(example)
    golds = [task.gold(example) for example in examples]
    metrics, _ = task.score(examples, golds, golds)
    assert metrics["provider_f1_macro"] == pytest.approx(1.0)
    assert metrics["urgency_f1_macro"] == pytest.approx(1.0)
    assert metrics["exact_match"] == pytest.approx(1.0)


def test_messages_hold_instruction_and_message(task: TriageTask) -> None:
    example = task.load_split("val")[0]
    [message] = task.messages(example)
    assert message["role"] == "user"
    assert message["content"].startswith(task.instruction)
    assert message["content"].endswith(example["text"])
    assert '"provider: <provider>; urgency: <urgency>"' in task.instruction


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_mistral"])
def test_max_new_tokens_covers_every_target(
    task: TriageTask, tiny_models: dict[str, Any], model_name: str
) -> None:
    tokenizer = tiny_models[model_name].tokenizer
    longest = max(
        len(
            tokenizer(
                completion_text(tokenizer, task.messages(ex), task.target_text(ex)),
                add_special_tokens=False,
            )["input_ids"]
        )
        for ex in task.load_split("test")
    )
    assert longest <= task.max_new_tokens


def test_train_py_composes_with_triage(run_env: dict[str, str]) -> None:
    result = run_script("train.py", ["task=triage", "--cfg", "job"], run_env)
    cfg = yaml.safe_load(result.stdout)
    assert cfg["task"]["_target_"] == "clintune.tasks.triage.TriageTask"
    assert cfg["task"]["name"] == "triage"
    assert cfg["task"]["provider_labels"] == PROVIDERS
    assert cfg["task"]["urgency_labels"] == URGENCIES
