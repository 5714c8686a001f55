"""task=custom: a task from config alone. The worked examples score exactly as the shipped
tasks they copy; templates, messages, the three answer types, DPO pairs, the config check
and the paired tests that follow from each metric's name."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import hydra
import pytest
from helpers import compose_train

from clintune.eval.runner import score_outputs
from clintune.eval.significance import METRIC_TESTS, compare, metric_test
from clintune.methods.preferences import build_pairs
from clintune.settings import ConfigError, custom_task_settings, settings_from
from clintune.tasks.base import headline_record
from clintune.tasks.custom import CustomTask
from clintune.tasks.data import DataValidationError


def _compose(name: str, cache: Path, *overrides: str) -> Any:
    cfg = compose_train([f"task={name}", *overrides], cache)
    return hydra.utils.instantiate(cfg.task, _convert_="partial")


def _task(tmp_path: Path, rows: list[dict[str, Any]], **config: Any) -> CustomTask:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return CustomTask(name="custom", data={"test": str(path)}, **config)


YES_NO = {"label": {"type": "label", "labels": ["yes", "no"]}}

# --------------------------------------------------------------------------- worked examples


def _noisy_outputs(golds: list[str], seed: int) -> list[str]:
    """Outputs as a model writes them: right, wrong, decorated, hedged, empty."""
    rng = random.Random(seed)
    shapes = ["{g}", "{o}", "{G}.", "**{g}**, because", "{g} or {o}", "", "maybe", "No idea"]
    outputs = []
    for gold in golds:
        other = "no" if gold == "yes" else "yes"
        shape = rng.choice(shapes)
        outputs.append(shape.format(g=gold, o=other, G=gold.capitalize()))
    return outputs


def test_pubmedqa_through_custom_scores_exactly_as_pubmedqa(tmp_path: Path) -> None:
    shipped = _compose("pubmedqa", tmp_path)
    custom = _compose("pubmedqa_custom", tmp_path)
    examples = shipped.load_split("test")
    assert custom.load_split("test") == examples
    # What training and DPO see: the same prompt, target and rejected answers.
    for example in examples:
        assert custom.messages(example) == shipped.messages(example)
        assert custom.target_text(example) == shipped.target_text(example)
        assert custom.wrong_answers(example) == shipped.wrong_answers(example)
    assert custom.max_new_tokens == shipped.max_new_tokens
    # What evaluation reports, on identical outputs: every metric and interval.
    outputs = _noisy_outputs([e["label"] for e in examples], seed=3)
    bootstrap = {"samples": 300, "seed": 1}
    ours = score_outputs(custom, examples, outputs, bootstrap=bootstrap)
    theirs = score_outputs(shipped, examples, outputs, bootstrap=bootstrap)
    assert ours.metrics == theirs.metrics
    assert ours.predictions == theirs.predictions
    assert 0.2 < ours.metrics["f1_macro"] < 0.8  # the outputs are a real mix
    cache = tmp_path / "c"
    assert (
        headline_record(compose_train(["task=pubmedqa_custom"], cache))["headline_metric"]
        == headline_record(compose_train(["task=pubmedqa"], cache))["headline_metric"]
    )


def test_triage_custom_scores_as_triage_on_the_answer_format(tmp_path: Path) -> None:
    shipped = _compose("triage", tmp_path)
    custom = _compose("triage_custom", tmp_path)
    examples = shipped.load_split("test")[:80]
    rng = random.Random(0)
    outputs = []
    for example in examples:
        provider = rng.choice([example["provider"], *shipped.provider_labels])
        urgency = rng.choice([example["urgency"], *shipped.urgency_labels])
        outputs.append(rng.choice([f"provider: {provider}; urgency: {urgency}", "", "hm"]))
    assert all(custom.target_text(e) == shipped.target_text(e) for e in examples)
    ours = score_outputs(custom, examples, outputs, bootstrap={"samples": 50}).metrics
    theirs = score_outputs(shipped, examples, outputs, bootstrap={"samples": 50}).metrics
    for key in (
        "provider_f1_macro",
        "provider_accuracy",
        "urgency_f1_macro",
        "urgency_accuracy",
        "exact_match",
        "provider_f1_class_nurse",
    ):
        assert ours[key] == theirs[key], key
    assert custom.headline_metric == "provider_f1_macro"


# --------------------------------------------------------------------------- prompts


def test_template_fields_are_required_and_problems_name_file_line_and_field(
    tmp_path: Path,
) -> None:
    rows = [
        {"id": "1", "note": "Dysuria.", "label": "yes"},
        {"id": "2", "label": "no"},  # no note
        {"id": "3", "note": "", "label": "no"},
        {"id": "4", "note": "Fine.", "label": "perhaps"},
        {"id": "5", "note": {"a": 1}, "label": "no"},  # the template's .upper() fails on it
    ]
    task = _task(tmp_path, rows, prompt="Note: {{ note.upper() }}", answers=YES_NO)
    with pytest.raises(DataValidationError) as raised:
        task.load_split("test")
    path = tmp_path / "data.jsonl"
    problems = raised.value.problems
    assert f"{path}:2: field 'note': missing" in problems
    assert f"{path}:3: field 'note': expected non-empty string" in problems
    assert f"{path}:4: field 'label': expected one of ['yes', 'no'], got 'perhaps'" in problems
    assert any(p.startswith(f"{path}:5: field 'prompt' (the template):") for p in problems)
    assert len(problems) == 4


def test_template_renders_the_record_with_loops_and_the_instruction(tmp_path: Path) -> None:
    row = {"id": "1", "question": "Which?", "options": {"A": "x", "B": "y"}, "answer": "B"}
    prompt = "{{ question }}\n{% for k, v in options.items() %}{{ k }}. {{ v }}\n{% endfor %}"
    answers = {"answer": {"type": "letter", "letters": ["A", "B"]}}
    task = _task(tmp_path, [row], prompt=prompt, answers=answers, instruction="Pick one.")
    [example] = task.load_split("test")
    assert task.messages(example) == [
        {"role": "user", "content": "Pick one.\n\nWhich?\nA. x\nB. y"}
    ]
    assert task.parse("y", example) == "B"  # an option's text counts, as in reasoning
    assert task.parse("(A)", example) == "A"
    assert task.wrong_answers(example) == ["A"]


def test_messages_list_in_the_record(tmp_path: Path) -> None:
    system = {"role": "system", "content": "You triage."}
    rows = [
        # the answer in its own field
        {
            "id": "1",
            "messages": [system, {"role": "user", "content": "Chest pain."}],
            "label": "yes",
        },
        # TRL's conversational format: the answer is the last assistant turn
        {
            "id": "2",
            "messages": [
                {"role": "user", "content": "A cold."},
                {"role": "assistant", "content": "no"},
            ],
        },
    ]
    task = _task(tmp_path, rows, answers=YES_NO)
    first, second = task.load_split("test")
    assert task.messages(first) == rows[0]["messages"]
    assert task.messages(second) == [{"role": "user", "content": "A cold."}]
    assert task.target_text(second) == "no" == task.gold(second)
    assert task.input_text(first) == "You triage.\n\nChest pain."


def test_bad_messages_are_reported_by_file_line_and_field(tmp_path: Path) -> None:
    rows = [
        {"id": "1", "messages": [{"role": "doctor", "content": "x"}], "label": "yes"},
        {"id": "2", "messages": [{"role": "assistant", "content": "yes"}]},
        {"id": "3", "messages": [{"role": "user", "content": "x"}]},  # no answer anywhere
        {
            "id": "4",
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": "perhaps"},
            ],
        },
        {"id": "5", "messages": "hello", "label": "no"},
    ]
    with pytest.raises(DataValidationError) as raised:
        _task(tmp_path, rows, answers=YES_NO).load_split("test")
    path = tmp_path / "data.jsonl"
    expected = [
        f"{path}:1: field 'messages': message 0: role must be one of",
        f"{path}:2: field 'messages': expected a user turn last",
        f"{path}:3: field 'label': missing (and no assistant turn ends 'messages')",
        f"{path}:4: field 'messages' (its last assistant turn): expected one of ['yes', 'no']",
        f"{path}:5: field 'messages': expected list",
    ]
    problems = raised.value.problems
    for fragment in expected:
        assert any(p.startswith(fragment) for p in problems), (fragment, problems)
    assert len(problems) == len(expected)


# --------------------------------------------------------------------------- answer types


def test_letter_answers_validate_options_and_score_accuracy(tmp_path: Path) -> None:
    answers = {"answer": {"type": "letter", "metrics": ["accuracy", "f1_macro"]}}
    good = {"id": "1", "q": "Q?", "options": dict(zip("ABCD", "wxyz", strict=True)), "answer": "C"}
    rows = [good, {**good, "id": "2", "options": {"A": "w", "B": "x"}}]
    with pytest.raises(DataValidationError, match=r":2: field 'options': expected keys"):
        _task(tmp_path, rows, prompt="{{ q }}", answers=answers).load_split("test")
    task = _task(tmp_path, [good], prompt="{{ q }}", answers=answers)
    [example] = task.load_split("test")
    result = score_outputs(task, [example, example], ["C", "The answer is D"])
    assert result.metrics["accuracy"] == 0.5
    assert result.metrics["f1_class_C"] == pytest.approx(2 / 3)  # P = 1, R = 1/2
    assert [row["correct"] for row in result.predictions] == [True, False]


def test_text_answers_score_rouge_l_and_exact_match(tmp_path: Path) -> None:
    answers = {"summary": {"type": "text"}}
    rows = [{"id": "1", "note": "n", "summary": "Pneumonia, treated with amoxicillin."}]
    task = _task(tmp_path, rows, prompt="{{ note }}", answers=answers, correct_rouge_l=0.5)
    [example] = task.load_split("test")
    outputs = ["pneumonia treated with amoxicillin", "pneumonia", ""]
    result = score_outputs(task, [example] * 3, outputs, bootstrap={"samples": 20})
    assert [r["correct"] for r in result.predictions] == [True, False, False]
    assert result.metrics["exact_match"] == pytest.approx(1 / 3)
    # ROUGE-L F: 1.0, then 1 of 4 reference words (P = 1, R = 1/4 → 0.4), then nothing.
    assert result.metrics["rougeL"] == pytest.approx((1.0 + 0.4 + 0.0) / 3)
    assert task.is_correct(example, "Pneumonia treated with amoxicillin today")
    assert not task.is_correct(example, "pneumonia")  # under correct_rouge_l
    assert task.wrong_answers(example) == []  # no closed set: pairs come from data or policy


# --------------------------------------------------------------------------- DPO pairs


class _Sampler:
    def __init__(self, outputs: list[str]) -> None:
        self.outputs = outputs

    def __call__(self, examples: list[dict], n: int) -> list[list[str]]:
        return [list(self.outputs) for _ in examples]


def test_dpo_pairs_from_rejected_field_wrong_label_or_policy(tmp_path: Path) -> None:
    rows = [
        {"id": "1", "note": "a", "label": "yes", "rejected": "no, not met"},
        {"id": "2", "note": "b", "label": "no"},
    ]
    task = _task(tmp_path, rows, prompt="{{ note }}", answers=YES_NO)
    examples = task.load_split("test")
    data, counts = build_pairs(task, examples, source="data")
    assert [(p.chosen, p.rejected) for p in data] == [("yes", "no, not met")]
    assert counts["pairs/missing_rejected_field"] == 1
    label, _ = build_pairs(task, examples, source="label")
    assert [(p.chosen, p.rejected) for p in label] == [("yes", "no"), ("no", "yes")]
    policy, counts = build_pairs(
        task, examples, source="on_policy", sampler=_Sampler(["Yes.", "No."])
    )
    assert [(p.chosen, p.rejected, p.source) for p in policy] == [
        ("yes", "No.", "on_policy"),
        ("no", "Yes.", "on_policy"),
    ]


def test_several_answers_pair_against_every_other_combination(tmp_path: Path) -> None:
    answers = {
        "dept": {"type": "label", "labels": ["gp", "er"]},
        "speed": {"type": "label", "labels": ["slow", "fast"]},
    }
    rows = [{"id": "1", "text": "t", "dept": "er", "speed": "fast"}]
    task = _task(tmp_path, rows, prompt="{{ text }}", answers=answers)
    [example] = task.load_split("test")
    assert task.target_text(example) == "dept: er; speed: fast"
    assert sorted(task.wrong_answers(example)) == [
        "dept: er; speed: slow",
        "dept: gp; speed: fast",
        "dept: gp; speed: slow",
    ]
    assert task.parse("Dept: GP; speed: fast", example) == {"dept": "gp", "speed": "fast"}
    assert task.parse("speed: slow", example) == {"dept": None, "speed": "slow"}
    assert task.parse("nothing", example) is None
    result = score_outputs(task, [example] * 2, ["dept: er; speed: slow", "dept: er; speed: fast"])
    assert result.metrics["dept_accuracy"] == 1.0
    assert result.metrics["speed_accuracy"] == 0.5
    assert result.metrics["exact_match"] == 0.5
    assert {"dept_f1_macro", "speed_f1_macro", "dept_f1_class_er"} <= set(result.metrics)


# --------------------------------------------------------------------------- config check


def _custom_problems(tmp_path: Path, *overrides: str) -> list[str]:
    cfg = compose_train(["task=custom", *overrides], tmp_path)
    with pytest.raises(ConfigError) as raised:
        settings_from(cfg)
    return raised.value.problems


def test_every_custom_task_config_problem_is_reported_before_loading(tmp_path: Path) -> None:
    problems = _custom_problems(
        tmp_path,
        "task.answers={a: {type: lable}, b: {type: label, labels: [x]}, "
        "c: {type: text, metrics: [f1_macro]}, d: {type: label, lables: [p, q]}}",
        "task.prompt='{{ note '",
        "task.headline=f1",
        "task.correct_rouge_l=2",
    )
    text = "\n".join(problems)
    assert "task.answers.a.type='lable' is not allowed: expected one of 'label'" in text
    assert "(did you mean 'label'?)" in text
    assert "task.answers.d.lables is not a known key: did you mean task.answers.d.labels?" in text
    assert "task.correct_rouge_l=2 is not allowed: expected >= 0 and <= 1" in text
    # the cross-checks run once every value has its type
    problems = _custom_problems(
        tmp_path,
        "task.answers={b: {type: label, labels: [x]}, c: {type: text, metrics: [f1_macro]}}",
        "task.prompt='{{ note '",
        "task.headline=f1",
    )
    text = "\n".join(problems)
    assert "task.answers.b.labels: a label answer needs two or more labels" in text
    assert "task.answers.c.metrics: 'f1_macro' does not apply to a text answer" in text
    assert "a free-text answer must be the only answer" in text
    assert "task.headline='f1' is not allowed: expected one of" in text
    assert "task.prompt: not a valid Jinja template" in text


def test_answers_must_be_given_and_labels_must_not_be_shared(tmp_path: Path) -> None:
    assert any("task.answers" in p for p in _custom_problems(tmp_path))
    shared = "task.answers={a: {type: label, labels: [x, y]}, b: {type: label, labels: [y, z]}}"
    assert any("'y' is also a label of answer 'a'" in p for p in _custom_problems(tmp_path, shared))
    with pytest.raises(ConfigError, match="only a letter answer has letters"):
        custom_task_settings({"answers": {"a": {"type": "text", "letters": ["A", "B"]}}})


# --------------------------------------------------------------------------- paired tests


def test_paired_tests_follow_from_each_metric_name() -> None:
    assert metric_test("accuracy") == METRIC_TESTS["accuracy"]
    assert metric_test("dept_accuracy").field == "dept_correct"
    assert metric_test("dept_exact_match").kind == "mcnemar"
    assert metric_test("dept_f1_macro").part == "dept"
    assert metric_test("summary_rougeL").field == "summary_rougeL"
    assert metric_test("likert_graded") is None
    targets = [{"dept": "gp"}, {"dept": "er"}, {"dept": "gp"}, {"dept": "er"}]
    a = [{"id": str(i), "target": t, "prediction": {"dept": "gp"}} for i, t in enumerate(targets)]
    b = [{**row, "prediction": row["target"]} for row in a]
    for rows in (a, b):
        for row in rows:
            row["dept_correct"] = row["prediction"]["dept"] == row["target"]["dept"]
    assert compare("dept_accuracy", a, b).effect == 0.5
    assert compare("dept_f1_macro", a, b, n_resamples=100).effect == pytest.approx(1 - 1 / 3)
