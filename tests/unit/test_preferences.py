"""Preference pairs (``build_pairs``) on the real tasks: where rejected answers come from,
reproducibility, the fallbacks and every count that ends up in metrics.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import compose_train
from hydra.utils import instantiate

from clintune.methods.preferences import (
    SOURCES,
    FeedbackError,
    PreferencePair,
    UnpairedExample,
    answer_shift,
    build_pairs,
    mismatched_completions,
    split_by_feedback,
    unpaired_counts,
    unpaired_from_pairs,
)
from clintune.tasks.base import Task

_TASKS: dict[tuple[str, ...], Task] = {}


@pytest.fixture
def tasks(cache_dir: Path):
    """Real Task objects, built from the task configs as train.py builds them."""

    def make(name: str, *overrides: str) -> Task:
        key = (name, *overrides)
        if key not in _TASKS:
            cfg = compose_train([f"task={name}", *overrides], cache_dir)
            _TASKS[key] = instantiate(cfg.task, _convert_="partial")
        return _TASKS[key]

    return make


def _classification(idx: int, label: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": f"c{idx}",
        "text": f"note {idx}: dysuria, nitrite positive",
        "label": label,
        **extra,
    }


def _triage(idx: int, provider: str = "nurse", urgency: str = "soon") -> dict[str, Any]:
    return {"id": f"t{idx}", "text": f"message {idx}", "provider": provider, "urgency": urgency}


def _summary(idx: int) -> dict[str, Any]:
    return {
        "id": f"s{idx}",
        "text": f"Note {idx}: 40-year-old man with cough, diagnosed with pneumonia.",
        "summary": f"40-year-old man number {idx} with cough, diagnosed with pneumonia.",
    }


class FakeSampler:
    """Stands in for the policy: fixed outputs per example id; records what it was asked."""

    def __init__(self, outputs: dict[str, list[str]]) -> None:
        self.outputs = outputs
        self.calls: list[tuple[list[str], int]] = []

    def __call__(self, examples: list[dict[str, Any]], count: int) -> list[list[str]]:
        self.calls.append(([e["id"] for e in examples], count))
        return [self.outputs[e["id"]][:count] for e in examples]


def _by_id(pairs) -> dict[str, list]:
    grouped: dict[str, list] = {}
    for pair in pairs:
        grouped.setdefault(pair.example_id, []).append(pair)
    return grouped


# --------------------------------------------------------------------------- source=data


def test_data_source_uses_the_rejected_field_and_counts_missing_ones(tasks) -> None:
    task = tasks("classification")
    examples = [
        _classification(0, "yes", rejected="no"),
        _classification(1, "no", rejected="yes, the criteria are met"),
        _classification(2, "yes"),  # no rejected field: no pair, never a label pair
    ]
    pairs, counts = build_pairs(task, examples, source="data")
    assert [(p.example_id, p.chosen, p.rejected, p.source) for p in pairs] == [
        ("c0", "yes", "no", "data"),
        ("c1", "no", "yes, the criteria are met", "data"),
    ]
    assert pairs[0].messages == task.messages(examples[0])
    assert counts == {
        "pairs/from_data": 2,
        "pairs/missing_rejected_field": 1,
        "pairs/examples_without_pair": 1,
        "pairs/total": 2,
    }


def test_data_source_without_any_rejected_field_gives_no_pairs(tasks) -> None:
    task = tasks("triage")
    pairs, counts = build_pairs(task, [_triage(i) for i in range(3)], source="data")
    assert pairs == []
    assert counts["pairs/missing_rejected_field"] == 3
    assert counts["pairs/examples_without_pair"] == 3
    assert counts["pairs/total"] == 0
    assert "pairs/from_label" not in counts


def test_auto_prefers_data_and_falls_back_to_a_wrong_label(tasks) -> None:
    task = tasks("classification")
    examples = [_classification(0, "yes", rejected="maybe"), _classification(1, "yes")]
    pairs, counts = build_pairs(task, examples, source="auto")
    assert [(p.example_id, p.rejected, p.source) for p in pairs] == [
        ("c0", "maybe", "data"),
        ("c1", "no", "label"),
    ]
    assert counts["pairs/from_data"] == 1 and counts["pairs/from_label"] == 1
    assert "pairs/missing_rejected_field" not in counts  # only counted for source=data


# --------------------------------------------------------------------------- source=label


@pytest.mark.parametrize("name", ["classification", "triage", "reasoning", "reasoning_open"])
def test_label_pairs_on_real_data_never_reject_the_gold_answer(tasks, name: str) -> None:
    task = tasks(name)
    examples = task.load_split("val")[:40]
    pairs, counts = build_pairs(task, examples, source="label", seed=3)
    assert len(pairs) == len(examples) == counts["pairs/total"] == counts["pairs/from_label"]
    assert set(counts) == {"pairs/from_label", "pairs/total"}
    for example, pair in zip(examples, pairs, strict=True):
        assert pair.example_id == example["id"] and pair.source == "label"
        assert pair.chosen == task.target_text(example)
        assert pair.rejected != pair.chosen
        assert pair.rejected in task.wrong_answers(example)
        assert not task.is_correct(example, pair.rejected)
        assert task.is_correct(example, pair.chosen)


def test_label_pairs_are_reproducible_per_seed(tasks) -> None:
    task = tasks("triage")
    examples = task.load_split("train")[:30]
    assert all(len(task.wrong_answers(e)) == 15 for e in examples)
    first, _ = build_pairs(task, examples, source="label", seed=0)
    again, _ = build_pairs(task, examples, source="label", seed=0)
    other, _ = build_pairs(task, examples, source="label", seed=1)
    assert first == again
    # 30 examples, 15 choices each: two seeds agreeing everywhere has probability 15**-30.
    assert [p.rejected for p in first] != [p.rejected for p in other]
    # Per-example generators: a pair does not depend on which other examples are present.
    alone, _ = build_pairs(task, examples[7:8], source="label", seed=0)
    assert alone == [first[7]]


def test_label_pairs_respect_max_pairs_per_example(tasks) -> None:
    task = tasks("triage")
    examples = [_triage(i, "pharmacist", "urgent") for i in range(4)]
    pairs, counts = build_pairs(task, examples, source="label", max_pairs_per_example=3)
    grouped = _by_id(pairs)
    assert sorted(grouped) == ["t0", "t1", "t2", "t3"]
    for group in grouped.values():
        rejected = [p.rejected for p in group]
        assert len(rejected) == len(set(rejected)) == 3
        assert "provider: pharmacist; urgency: urgent" not in rejected
    assert counts["pairs/from_label"] == counts["pairs/total"] == 12
    # Classification has one wrong label: the cap cannot invent more.
    cls_pairs, _ = build_pairs(
        tasks("classification"), [_classification(0, "no")], source="label", max_pairs_per_example=3
    )
    assert [p.rejected for p in cls_pairs] == ["yes"]


def test_label_source_for_a_task_without_wrong_labels_gives_no_pair(tasks) -> None:
    task = tasks("summarization")
    pairs, counts = build_pairs(task, [_summary(0), _summary(1)], source="label")
    assert pairs == []
    assert counts == {"pairs/examples_without_pair": 2, "pairs/total": 0}


# --------------------------------------------------------------------------- on_policy


def test_on_policy_wrong_samples_become_rejected_up_to_the_cap(tasks) -> None:
    task = tasks("triage")
    gold = "provider: nurse; urgency: soon"
    examples = [_triage(0), _triage(1), _triage(2)]
    sampler = FakeSampler(
        {
            # three distinct wrong samples (one twice, one padded): capped at 2, deduplicated
            "t0": [
                "provider: admin; urgency: routine",
                gold,
                "  provider: admin; urgency: routine ",
                "provider: physician; urgency: emergent",
                "provider: pharmacist; urgency: soon",
            ],
            # one wrong sample among right ones; an empty sample is no answer to reject
            "t1": [gold, "   ", "provider: nurse; urgency: urgent", gold, gold],
            # every sample right: falls back to a wrong label
            "t2": [gold, "Provider: Nurse; Urgency: Soon", gold, gold, gold],
        }
    )
    pairs, counts = build_pairs(
        task,
        examples,
        source="on_policy",
        sampler=sampler,
        samples_per_example=5,
        max_pairs_per_example=2,
        seed=0,
    )
    assert sampler.calls == [(["t0", "t1", "t2"], 5)]
    grouped = _by_id(pairs)
    assert [(p.rejected, p.source) for p in grouped["t0"]] == [
        ("provider: admin; urgency: routine", "on_policy"),
        ("provider: physician; urgency: emergent", "on_policy"),
    ]
    assert [(p.rejected, p.source) for p in grouped["t1"]] == [
        ("provider: nurse; urgency: urgent", "on_policy")
    ]
    fallback = grouped["t2"]
    assert len(fallback) == 2 and {p.source for p in fallback} == {"label_fallback"}
    assert all(p.rejected in task.wrong_answers(examples[2]) for p in fallback)
    assert all(p.chosen == gold for p in pairs)
    assert counts == {
        "pairs/from_on_policy": 3,
        "pairs/from_label_fallback": 2,
        "pairs/on_policy_all_correct": 1,
        "pairs/total": 5,
    }


def test_on_policy_classification_all_correct_falls_back_to_the_other_label(tasks) -> None:
    task = tasks("classification")
    examples = [_classification(0, "yes"), _classification(1, "no")]
    sampler = FakeSampler({"c0": ["yes", "Yes.", "yes"], "c1": ["yes", "no", "yes"]})
    pairs, counts = build_pairs(task, examples, source="on_policy", sampler=sampler)
    assert [(p.example_id, p.rejected, p.source) for p in pairs] == [
        ("c0", "no", "label_fallback"),
        ("c1", "yes", "on_policy"),
    ]
    assert counts["pairs/on_policy_all_correct"] == 1
    assert counts["pairs/from_label_fallback"] == 1 and counts["pairs/from_on_policy"] == 1


def test_on_policy_summarization_without_wrong_labels_leaves_examples_without_pair(
    tasks,
) -> None:
    task = tasks("summarization")
    examples = [_summary(0), _summary(1), _summary(2)]
    sampler = FakeSampler(
        {
            "s0": [examples[0]["summary"]] * 2,  # right (ROUGE-L 1.0): nothing to reject
            "s1": ["Patient seen.", examples[1]["summary"]],
            "s2": [examples[2]["summary"].upper(), examples[2]["summary"]],
        }
    )
    assert task.wrong_answers(examples[0]) == []
    pairs, counts = build_pairs(
        task, examples, source="on_policy", sampler=sampler, samples_per_example=2
    )
    assert [(p.example_id, p.rejected, p.source) for p in pairs] == [
        ("s1", "Patient seen.", "on_policy")
    ]
    assert counts == {
        "pairs/on_policy_all_correct": 2,
        "pairs/from_on_policy": 1,
        "pairs/examples_without_pair": 2,
        "pairs/total": 1,
    }


def test_auto_samples_on_policy_only_for_tasks_without_wrong_labels(tasks) -> None:
    summary = tasks("summarization")
    examples = [_summary(0), {**_summary(1), "rejected": "A wrong summary."}]
    sampler = FakeSampler({"s0": ["Unrelated text."], "s1": ["never asked"]})
    pairs, _ = build_pairs(summary, examples, source="auto", sampler=sampler, samples_per_example=1)
    # The example with its own rejected answer is not sampled.
    assert sampler.calls == [(["s0"], 1)]
    assert [(p.example_id, p.rejected, p.source) for p in pairs] == [
        ("s0", "Unrelated text.", "on_policy"),
        ("s1", "A wrong summary.", "data"),
    ]
    # A task with wrong labels does not call the sampler under auto.
    unused = FakeSampler({})
    pairs, _ = build_pairs(
        tasks("classification"), [_classification(0, "yes")], source="auto", sampler=unused
    )
    assert unused.calls == [] and pairs[0].source == "label"


def test_on_policy_needs_a_sampler(tasks) -> None:
    with pytest.raises(ValueError, match="sampler"):
        build_pairs(tasks("classification"), [_classification(0, "yes")], source="on_policy")


# --------------------------------------------------------------------------- dropping


def test_rejected_equal_to_chosen_after_normalisation_is_dropped(tasks) -> None:
    task = tasks("triage")
    examples = [
        {**_triage(0), "rejected": "  Provider:   NURSE;\nurgency: soon "},
        {**_triage(1), "rejected": "provider: admin; urgency: soon"},
    ]
    pairs, counts = build_pairs(task, examples, source="data")
    assert [(p.example_id, p.rejected) for p in pairs] == [("t1", "provider: admin; urgency: soon")]
    assert counts == {
        "pairs/dropped_rejected_equals_chosen": 1,
        "pairs/examples_without_pair": 1,
        "pairs/from_data": 1,
        "pairs/total": 1,
    }


def test_on_policy_sample_equal_to_chosen_is_dropped(tasks) -> None:
    # A sample the metric calls wrong but whose text is the gold one (a threshold below
    # which even the reference scores, here ROUGE-L over 1.0) must not become a pair.
    strict = tasks("summarization", "task.correct_rouge_l=1.01")
    example = _summary(0)
    sampler = FakeSampler({"s0": [" " + example["summary"].upper()]})
    pairs, counts = build_pairs(
        strict, [example], source="on_policy", sampler=sampler, samples_per_example=1
    )
    assert pairs == []
    assert counts["pairs/dropped_rejected_equals_chosen"] == 1
    assert counts["pairs/examples_without_pair"] == 1


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("source", ["labels", "", "DATA", "policy"])
def test_invalid_source_raises(tasks, source: str) -> None:
    assert source not in SOURCES
    with pytest.raises(ValueError, match=r"method\.pairs\.source"):
        build_pairs(tasks("classification"), [_classification(0, "yes")], source=source)


# --------------------------------------------------------------------------- KTO: unpaired


def _feedback(idx: int, label: str, completion: str | None = "provider: nurse; urgency: soon"):
    record = _triage(idx)
    record["label"] = label
    if completion is not None:
        record["completion"] = completion
    return record


def test_auto_takes_the_records_feedback_and_derives_the_rest_from_pairs(tasks) -> None:
    task = tasks("triage")
    examples = [_feedback(0, "desirable"), _feedback(1, "undesirable"), _triage(2), _triage(3)]
    own, rest = split_by_feedback(task, examples, source="auto", label_field="label")
    assert [(u.example_id, u.desirable, u.source) for u in own] == [
        ("t0", True, "data"),
        ("t1", False, "data"),
    ]
    assert own[0].completion == "provider: nurse; urgency: soon"
    assert own[0].messages == task.messages(examples[0])
    assert [e["id"] for e in rest] == ["t2", "t3"]

    pairs, _ = build_pairs(task, rest, source="label", seed=0)
    derived = unpaired_from_pairs(pairs)
    assert [(u.example_id, u.desirable) for u in derived] == [
        ("t2", True),
        ("t2", False),
        ("t3", True),
        ("t3", False),
    ]
    assert derived[0].completion == task.target_text(rest[0])
    assert derived[1].completion == pairs[0].rejected
    assert unpaired_counts(own + derived) == {
        "unpaired/desirable": 3,
        "unpaired/undesirable": 3,
        "unpaired/from_data": 2,
        "unpaired/from_pairs": 4,
        "unpaired/total": 6,
    }


def test_data_and_pairs_sources_take_only_their_own(tasks) -> None:
    task = tasks("triage")
    examples = [_feedback(0, "desirable"), _triage(1)]
    own, rest = split_by_feedback(task, examples, source="data", label_field="label")
    assert [u.example_id for u in own] == ["t0"] and rest == []
    own, rest = split_by_feedback(task, examples, source="pairs", label_field="label")
    assert own == [] and [e["id"] for e in rest] == ["t0", "t1"]


def test_a_gold_label_field_is_not_feedback(tasks) -> None:
    """Classification's own ``label`` (yes/no) is the gold answer, not a thumbs-up: with no
    ``completion`` the record is left to the pairs; KTO feedback there needs another field."""
    task = tasks("classification")
    examples = [_classification(0, "yes"), _classification(1, "no", verdict="desirable")]
    examples[1]["completion"] = "yes"
    own, rest = split_by_feedback(task, examples, source="auto", label_field="verdict")
    assert [u.example_id for u in own] == ["c1"] and [e["id"] for e in rest] == ["c0"]


@pytest.mark.parametrize(
    ("record", "match"),
    [
        (_feedback(0, "good"), r"'label' must be 'desirable' or 'undesirable'.*'good'"),
        (_feedback(0, "desirable", completion="  "), "'completion' must be non-empty"),
        (_feedback(0, "undesirable", completion=None), "no 'completion' field"),
    ],
)
def test_inconsistent_feedback_names_the_example_and_field(tasks, record, match: str) -> None:
    with pytest.raises(FeedbackError, match=match) as raised:
        split_by_feedback(tasks("triage"), [record], source="auto", label_field="label")
    assert "'t0'" in str(raised.value)


def test_unpaired_from_pairs_keeps_a_repeated_chosen_answer_once(tasks) -> None:
    task = tasks("triage")
    pairs, _ = build_pairs(task, [_triage(0)], source="label", seed=0, max_pairs_per_example=3)
    assert len(pairs) == 3
    derived = unpaired_from_pairs(pairs)
    assert [u.desirable for u in derived] == [True, False, False, False]


def _unpaired(ids: list[str]) -> list[UnpairedExample]:
    return [
        UnpairedExample(i, [{"role": "user", "content": i}], f"{i}-answer-{n}", n % 2 == 0, "pairs")
        for n, i in enumerate(ids)
    ]


def test_mismatched_completions_come_from_other_prompts_and_are_seeded() -> None:
    # Derived pairs put two completions of one prompt side by side.
    examples = _unpaired(["a", "a", "b", "b", "c", "c", "d"])
    mismatched = mismatched_completions(examples, seed=0)
    assert len(mismatched) == len(examples)
    by_text = {u.completion: u.example_id for u in examples}
    for example, other in zip(examples, mismatched, strict=True):
        assert by_text[other] != example.example_id
    assert mismatched_completions(examples, seed=0) == mismatched
    assert any(mismatched_completions(examples, seed=s) != mismatched for s in range(1, 5))
    two = _unpaired(["a", "b"])
    assert mismatched_completions(two, seed=3) == ["b-answer-1", "a-answer-0"]


def test_mismatched_completions_need_two_prompts() -> None:
    with pytest.raises(ValueError, match="at least two different prompts"):
        mismatched_completions(_unpaired(["a", "a", "a"]), seed=0)


# --------------------------------------------------------------------------- answer shift


def _shipped(task: str) -> list[dict[str, Any]]:
    path = Path(__file__).resolve().parents[2] / "data" / task / "train.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_uniform_wrong_labels_shift_triage_towards_the_majority_provider(tasks) -> None:
    triage = tasks("triage")
    examples = _shipped("triage")
    pairs, _ = build_pairs(triage, examples, source="label", seed=0)
    shift = answer_shift(triage, examples, pairs)
    # physician is ~41% of the chosen providers and ~25% of the rejected ones
    assert 0.15 < shift["pairs/answer_shift_tv/provider"] < 0.3
    assert set(shift) == {"pairs/answer_shift_tv/provider", "pairs/answer_shift_tv/urgency"}
    # rejecting each example's own answer with a copy of the chosen side's label marginal
    # (a permutation of the chosen answers) leaves no shift at all
    chosen = [p.chosen for p in pairs]
    rotated = chosen[1:] + chosen[:1]
    balanced = [
        PreferencePair(p.example_id, p.messages, p.chosen, r, p.source)
        for p, r in zip(pairs, rotated, strict=True)
    ]
    balanced_shift = answer_shift(triage, examples, balanced)
    assert balanced_shift["pairs/answer_shift_tv/provider"] == pytest.approx(0.0, abs=1e-12)


def test_binary_labels_shift_by_their_imbalance_and_free_text_has_none(tasks) -> None:
    classification = tasks("classification")
    examples = [_classification(i, "yes" if i % 4 else "no") for i in range(40)]
    pairs, _ = build_pairs(classification, examples, source="label", seed=0)
    # 3/4 yes chosen means 3/4 no rejected: the two marginals are mirror images
    assert answer_shift(classification, examples, pairs) == {
        "pairs/answer_shift_tv/answer": pytest.approx(0.5)
    }
    summarization = tasks("summarization")
    summaries = [_summary(i) for i in range(3)]
    pairs = [PreferencePair(s["id"], [], s["summary"], "something else", "data") for s in summaries]
    assert answer_shift(summarization, summaries, pairs) == {}


@pytest.mark.parametrize("task_name", ["reasoning", "reasoning_open"])
def test_answer_shift_of_lettered_and_free_text_reasoning(tasks, task_name: str) -> None:
    reasoning = tasks(task_name)
    examples = _shipped("reasoning")[:200]
    pairs, _ = build_pairs(reasoning, examples, source="label", seed=0)
    shift = answer_shift(reasoning, examples, pairs)
    assert set(shift) == {"pairs/answer_shift_tv/answer"}
    # letters are balanced on both sides; diagnosis names are not: the distractors are
    # drawn towards diagnoses that share findings, so some names are rejected far more often
    bound = (0.0, 0.1) if task_name == "reasoning" else (0.1, 1.0)
    assert bound[0] <= shift["pairs/answer_shift_tv/answer"] <= bound[1]
