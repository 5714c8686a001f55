"""Reasoning: the letter and free-text parsers, accuracy against hand-computed values, the
schema's option checks, and the shipped data in both modes through the real Hydra config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
import pytest
import yaml
from helpers import compose_train, run_script

from clintune.tasks.data import DataValidationError
from clintune.tasks.reasoning import (
    ReasoningTask,
    normalise_answer,
    parse_free_text,
    parse_letter,
)

OPTIONS = {
    "A": "congestive heart failure",
    "B": "pneumonia",
    "C": "acute cholecystitis",
    "D": "asthma exacerbation",
}


def _task(with_options: bool, data: dict[str, Any] | None = None) -> ReasoningTask:
    return ReasoningTask(
        name="reasoning", data=data or {}, instruction="Diagnose.", with_options=with_options
    )


def _compose(cache_dir: Path, with_options: bool) -> ReasoningTask:
    overrides = ["task=reasoning", f"task.with_options={str(with_options).lower()}"]
    cfg = compose_train(overrides, cache_dir)
    return hydra.utils.instantiate(cfg.task, _convert_="partial")


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        # well formed and near misses
        ("B", "B"),
        ("b", "B"),
        ("b)", "B"),
        ("(B)", "B"),
        ("[D]", "D"),
        ("**C**", "C"),
        ("B.", "B"),
        ("  B\n", "B"),
        ("Answer: B", "B"),
        ("answer: (d)", "D"),
        ("The answer is B", "B"),
        ("The correct answer is C: acute cholecystitis", "C"),
        ("Option C", "C"),
        ("B. Pneumonia", "B"),
        ("D asthma", "D"),
        ("A congestive heart failure", "A"),
        ("A. The answer is C", "A"),  # the leading letter wins
        ("B. Asthma exacerbation", "B"),  # the letter wins over a contradicting text
        # the option's text, exactly (after normalisation)
        ("Pneumonia.", "B"),
        ("  asthma   exacerbation ", "D"),
        ("The Pneumonia", "B"),
        # garbage and things that only look like letters
        ("", None),
        ("garbage", None),
        ("E", None),
        ("I think B and C", None),  # a bare letter mid-sentence is not an answer
        ("A 47-year-old man", None),  # the article, not option A
        ("a pneumonia is likely", None),
        ("answer is a pneumonia", None),
        ("Bronchitis", None),
        ("pneumonia or asthma exacerbation", None),
    ],
)
def test_parse_letter_with_option_texts(output: str, expected: str | None) -> None:
    assert parse_letter(output, options=OPTIONS) == expected


def test_parse_letter_without_option_texts_reads_only_letters() -> None:
    assert parse_letter("The answer is B") == "B"
    assert parse_letter("Pneumonia") is None
    assert parse_letter("A congestive heart failure") is None  # cannot tell it from the article
    assert parse_letter("E", letters=["A", "B", "C", "D", "E"]) == "E"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Pneumonia", "pneumonia"),
        ("The Graves' disease.", "graves disease"),
        ("iron-deficiency  anaemia", "iron deficiency anaemia"),
        ("  A  CVA ", "cva"),
        ("...", ""),
        # punctuation that carries meaning stays
        ("-0.45", "-0.45"),
        ("\u22120.45", "-0.45"),  # the Unicode minus sign is a minus
        ("0.45.", "0.45"),
        ("0\u00b7718", "0.718"),  # a middle dot between digits is a decimal point
        ("Naked (+) stranded RNA virus", "naked (+) stranded rna virus"),
        ("Naked (\u2212) stranded RNA virus", "naked (-) stranded rna virus"),
        ("CD4+ T cells", "cd4+ t cells"),
        ("p\u2009<\u20090.05", "p < 0.05"),
        ("PT: \u2191 | PTT \u2193", "pt \u2191 ptt \u2193"),  # arrows: MedQA dev-373, dev-790
        ("10 \u00b5g", "10 \u03bcg"),  # micro sign and Greek mu are one letter
    ],
)
def test_normalise_answer(text: str, expected: str) -> None:
    assert normalise_answer(text) == expected


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("pneumonia", "pneumonia"),
        ("Pneumonia.", "pneumonia"),
        ("The most likely diagnosis is pneumonia.", "pneumonia"),
        ("Diagnosis: Graves' disease", "graves disease"),
        ("The answer is: CVA", "cva"),
        ("Iron-deficiency anaemia\nbecause the ferritin is low.", "iron deficiency anaemia"),
        ("gout. It affects the big toe.", "gout"),
        ("not pneumonia", "not pneumonia"),
        ("", None),
        ("   \n", None),
        ("?!", None),
    ],
)
def test_parse_free_text(output: str, expected: str | None) -> None:
    assert parse_free_text(output) == expected


def test_accuracy_with_options_hand_computed() -> None:
    task = _task(with_options=True)
    predictions = [task.parse(o) for o in ["B", "garbage", "(c)", "A"]]
    golds = ["B", "D", "C", "B"]
    metrics, scores = task.score([{}] * 4, predictions, golds)
    assert predictions == ["B", None, "C", "A"]
    # right, unparseable (wrong), right, wrong → 2/4
    assert [s["correct"] for s in scores] == [True, False, True, False]
    assert metrics == {"accuracy": pytest.approx(0.5), "n_correct": 2.0}


def test_accuracy_free_text_hand_computed() -> None:
    task = _task(with_options=False)
    example = {
        "answer_text": "myocardial infarction",
        "synonyms": ["heart attack", "STEMI"],
    }
    gold = task.gold(example)
    assert gold == {
        "answer": "myocardial infarction",
        "synonyms": ["heart attack", "stemi"],
    }
    outputs = [
        "Myocardial infarction.",  # right: the answer
        "A heart attack",  # right: a synonym, article dropped
        "STEMI",  # right: a synonym, case ignored
        "not myocardial infarction",  # wrong: no containment match
        "myocardial infarction or angina",  # wrong: a hedge
        "",  # unparseable
    ]
    predictions = [task.parse(o) for o in outputs]
    metrics, scores = task.score([example] * 6, predictions, [gold] * 6)
    assert [s["correct"] for s in scores] == [True, True, True, False, False, False]
    assert metrics["accuracy"] == pytest.approx(3 / 6)
    assert metrics["n_correct"] == 3.0


def test_parse_with_example_matches_option_text() -> None:
    task = _task(with_options=True)
    example = {"options": OPTIONS}
    assert task.parse("Pneumonia", example) == "B"
    assert task.parse("Pneumonia") is None  # without the example there is no text to match


# Two MedQA dev items (dev lines 849 and 777) that the old normaliser, which turned every
# punctuation mark into a space, refused as "expected distinct option texts".
SIGNED_NUMBERS = {"A": "-0.45", "B": "1.80", "C": "0.45", "D": "-1.80"}
STRANDS = {
    "A": "Enveloped (+) stranded RNA virus",
    "B": "Enveloped (-) stranded RNA virus",
    "C": "Naked (+) stranded RNA virus",
    "D": "Naked (-) stranded RNA virus",
}


@pytest.mark.parametrize(("options", "answer"), [(SIGNED_NUMBERS, "C"), (STRANDS, "C")])
def test_options_that_differ_only_in_sign_are_valid_and_told_apart(
    tmp_path: Path, options: dict[str, str], answer: str
) -> None:
    row = _row("1", options=options, answer=answer, answer_text=options[answer], synonyms=[])
    [example] = _task(True, {"test": str(_write(tmp_path / "t.jsonl", [row]))}).load_split("test")
    assert example["options"] == options
    for letter, text in options.items():
        # An answer written as an option's text picks that option, not its sign twin.
        assert parse_letter(text, options=options) == letter


@pytest.mark.parametrize(
    ("output", "correct"),
    [
        ("0.45", True),
        ("The answer is 0.45.", True),
        ("\u22120.45", False),  # Unicode minus: the opposite sign, not the gold
        ("-0.45", False),
        ("1.80", False),
        ("045", False),
    ],
)
def test_free_text_scoring_keeps_the_sign(output: str, correct: bool) -> None:
    task = _task(with_options=False)
    example = {"answer_text": "0.45", "synonyms": [], "options": SIGNED_NUMBERS}
    [score] = task.score_examples([example], [task.parse(output, example)], [task.gold(example)])
    assert score["correct"] is correct
    assert task.is_correct(example, output) is correct


def test_free_text_scoring_tells_the_strands_apart() -> None:
    task = _task(with_options=False)
    example = {"answer_text": STRANDS["C"], "synonyms": []}
    assert task.is_correct(example, "Naked (+) stranded RNA virus")
    assert not task.is_correct(example, "Naked (\u2212) stranded RNA virus")
    assert not task.is_correct(example, "Naked (-) stranded RNA virus")
    # Wrong answers for label pairs must not include the gold under another sign's guise.
    assert task.wrong_answers({**example, "options": STRANDS}) == [
        STRANDS["A"],
        STRANDS["B"],
        STRANDS["D"],
    ]


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _row(example_id: str, **changes: Any) -> dict[str, Any]:
    row = {
        "id": example_id,
        "question": "A 47-year-old man wheezes. Which diagnosis?",
        "options": dict(OPTIONS),
        "answer": "D",
        "answer_text": "asthma exacerbation",
        "synonyms": ["acute asthma"],
    }
    row.update(changes)
    return row


def test_schema_rejects_bad_options_answers_and_synonyms(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "bad.jsonl",
        [
            _row("1"),
            _row("2", answer="E"),
            _row("3", options={"A": "x", "B": "y", "C": "z", "E": "w"}),
            _row("4", options={"A": "x", "B": "  ", "C": "z", "D": "w"}),
            _row("5", options={"A": "x", "B": "X.", "C": "z", "D": "w"}),
            _row("6", synonyms=["ok", 3]),
            _row("7", synonyms=[]),  # empty synonyms are fine
            {k: v for k, v in _row("8").items() if k != "synonyms"},  # and so is none at all
            _row("9", options=["x", "y", "z", "w"]),
        ],
    )
    with pytest.raises(DataValidationError) as caught:
        _task(True, {"test": str(path)}).load_split("test")
    message = str(caught.value)
    expected = [
        f"{path}:2: field 'answer': expected one of ['A', 'B', 'C', 'D'], got 'E'",
        f"{path}:3: field 'options': expected keys ['A', 'B', 'C', 'D']",
        f"{path}:4: field 'options': option B: expected a non-empty string",
        f"{path}:5: field 'options': expected distinct option texts",
        f"{path}:6: field 'synonyms': expected non-empty strings, got 3",
        f"{path}:9: field 'options': expected object, got list",
    ]
    for fragment in expected:
        assert fragment in message
    assert len(caught.value.problems) == len(expected)


def test_free_text_mode_does_not_need_options(tmp_path: Path) -> None:
    row = {k: v for k, v in _row("1").items() if k not in ("options", "answer")}
    path = _write(tmp_path / "free.jsonl", [row])
    [example] = _task(False, {"test": str(path)}).load_split("test")
    assert example["answer_text"] == "asthma exacerbation"
    with pytest.raises(DataValidationError, match="field 'options': missing"):
        _task(True, {"test": str(path)}).load_split("test")


@pytest.mark.parametrize("with_options", [True, False])
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_shipped_split_loads_and_targets_round_trip(
    cache_dir: Path, with_options: bool, split: str
) -> None:
    task = _compose(cache_dir, with_options)
    assert task.name == "reasoning" and task.headline_metric == "accuracy"
    examples = task.load_split(split)
    predictions = []
    for example in examples:
        target = task.target_text(example)
        prediction = task.parse(target)
        if with_options:
            assert target == example["answer"]
            assert prediction == task.gold(example)
            # the option's text alone also reads as its letter
            assert task.parse(example["answer_text"], example) == example["answer"]
        else:
            assert target == example["answer_text"]
            assert prediction == task.gold(example)["answer"]
        predictions.append(prediction)
    golds = [task.gold(example) for example in examples]
    metrics, _ = task.score(examples, predictions, golds)
    assert metrics["accuracy"] == pytest.approx(1.0)


@pytest.mark.parametrize("with_options", [True, False])
def test_messages_show_options_only_with_options(cache_dir: Path, with_options: bool) -> None:
    task = _compose(cache_dir, with_options)
    example = task.load_split("val")[0]
    [message] = task.messages(example)
    content = message["content"]
    assert content.startswith(task.instruction)
    assert example["question"] in content
    option_lines = [f"{letter}. {text}" for letter, text in sorted(example["options"].items())]
    if with_options:
        assert content.endswith("\n\n" + "\n".join(option_lines))
        assert "letter" in task.instruction
    else:
        assert content.endswith(example["question"])
        assert not any(line in content for line in option_lines)
        assert "name of the diagnosis" in task.instruction


@pytest.mark.parametrize("with_options", [True, False])
def test_train_py_composes_with_reasoning(run_env: dict[str, str], with_options: bool) -> None:
    flag = str(with_options).lower()
    result = run_script(
        "train.py", ["task=reasoning", f"task.with_options={flag}", "--cfg", "job"], run_env
    )
    cfg = yaml.safe_load(result.stdout)
    assert cfg["task"]["_target_"] == "clintune.tasks.reasoning.ReasoningTask"
    assert cfg["task"]["name"] == "reasoning"
    assert cfg["task"]["with_options"] is with_options
