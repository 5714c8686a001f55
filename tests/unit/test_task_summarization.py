"""The summarization task: config composition, data, ROUGE-L against a hand-computed value,
the Likert aggregation with missing grades, and the lazily built judge."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import compose_train, run_script
from hydra.utils import instantiate
from scipy import stats

from clintune.eval import judge as judge_module
from clintune.eval.judge import Judge, JudgeItem, parse_grade
from clintune.tasks.summarization import (
    EMPTY_SUMMARY_GRADE,
    EMPTY_SUMMARY_NOTE,
    SummarizationTask,
    rouge_l,
)

NO_JUDGE = {"kind": "none"}


def _task(judge: dict[str, Any] | None = None) -> SummarizationTask:
    return SummarizationTask(
        name="summarization",
        data={},
        instruction="Summarize.",
        max_new_tokens=40,
        judge=NO_JUDGE if judge is None else judge,
        cache_dir=".",
    )


def test_composes_through_the_cli(run_env: dict[str, str]) -> None:
    result = run_script("train.py", ["task=summarization", "--cfg", "job", "--resolve"], run_env)
    cfg = yaml.safe_load(result.stdout)
    task = cfg["task"]
    assert task["_target_"] == "clintune.tasks.summarization.SummarizationTask"
    assert task["name"] == "summarization"
    assert task["data"]["test"].endswith("data/summarization/test.jsonl")
    assert task["data"]["contains_sensitive_text"] is None  # decided from the data
    assert task["cache_dir"] == cfg["paths"]["cache_dir"]
    judge = task["judge"]
    assert judge["kind"] == "local"
    assert judge["model"]["name"] == "tiny_llama"
    assert judge["model"]["tiny"]["corpus"] == cfg["model"]["tiny"]["corpus"]
    assert judge["openai"]["allow_remote_text"] is False
    for name in ("{note}", "{summary}", "{reference}", "{rubric}"):
        assert name in judge["prompt_template"]
    assert cfg["logger"]["name"] == "tiny_llama-summarization-sft-s42"


def test_judge_model_is_chosen_apart_from_the_trained_model(run_env: dict[str, str]) -> None:
    args = [
        "task=summarization",
        "model=tiny_mistral",
        "model@task.judge.model=llama3",
        "task.judge.max_new_tokens=4",
        "--cfg",
        "job",
    ]
    cfg = yaml.safe_load(run_script("train.py", args, run_env).stdout)
    assert cfg["model"]["name"] == "tiny_mistral"
    assert cfg["task"]["judge"]["model"]["name"] == "llama3"
    assert cfg["task"]["judge"]["max_new_tokens"] == 4
    key_override = compose_train(
        ["task=summarization", "task.judge.model.max_length=300"], Path(".")
    )
    assert key_override.task.judge.model.max_length == 300
    assert key_override.model.max_length == 512


def test_instantiates_and_loads_all_splits(cache_dir: Path) -> None:
    cfg = compose_train(["task=summarization"], cache_dir)
    task = instantiate(cfg.task, _convert_="partial")
    assert isinstance(task, SummarizationTask)
    assert task.headline_metric == "rougeL"
    assert task.cache_dir == cache_dir
    assert task.max_new_tokens == 40
    sizes = {split: len(task.load_split(split)) for split in ("train", "val", "test")}
    assert sizes == {"train": 1200, "val": 100, "test": 150}
    example = task.load_split("val")[0]
    assert task.target_text(example) == task.gold(example) == example["summary"]
    assert task.input_text(example) == example["text"]
    message = task.messages(example)[0]["content"]
    assert message.startswith(task.instruction) and message.endswith(example["text"])


def test_parse() -> None:
    task = _task()
    assert task.parse("  45-year-old woman with cough.\n") == "45-year-old woman with cough."
    assert task.parse("") is None
    assert task.parse(" \n\t") is None


def test_rouge_l_matches_a_hand_computed_lcs() -> None:
    prediction = "man with gout started colchicine"
    reference = "55-year-old man with acute gout; started colchicine and advised diet"
    # Normalised reference tokens: 55 year old man with acute gout started colchicine and
    # advised diet (12). The whole prediction (5 tokens) is a subsequence: LCS = 5.
    precision, recall = 5 / 5, 5 / 12
    expected = 2 * precision * recall / (precision + recall)  # = 10/17
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-4)
    assert rouge_l(reference, reference) == pytest.approx(1.0)
    assert rouge_l(None, reference) == 0.0
    assert rouge_l("unrelated words", reference) == 0.0


def test_score_examples_without_a_judge() -> None:
    task = _task()
    examples = [{"id": "a", "text": "note a"}, {"id": "b", "text": "note b"}]
    golds = ["man with acute gout", "woman with cough"]
    scores = task.score_examples(examples, ["man with gout", None], golds)
    assert scores[0]["rougeL"] == pytest.approx(2 * (3 / 3 * 3 / 4) / (3 / 3 + 3 / 4), abs=1e-4)
    assert scores[1]["rougeL"] == 0.0
    # kind=none grades nothing, not even the empty summary.
    assert [s["likert"] for s in scores] == [None, None]
    assert all(isinstance(s["judge_output"], str) for s in scores)


def test_aggregate_counts_missing_grades_and_averages_only_graded() -> None:
    task = _task()
    scores = [
        {"rougeL": 0.5, "likert": 5, "judge_output": "5"},
        {"rougeL": 0.25, "likert": None, "judge_output": "3 or 4"},
        {"rougeL": 0.0, "likert": 2, "judge_output": "2"},
        {"rougeL": 0.25, "likert": None, "judge_output": "[judge error] HTTP 500"},
    ]
    metrics = task.aggregate([None] * 4, ["g"] * 4, scores)
    assert metrics["rougeL"] == pytest.approx(0.25)
    assert metrics["likert_mean"] == pytest.approx(3.5)  # (5 + 2) / 2, not (5+3+2+3) / 4
    assert metrics["likert_graded"] == 2.0
    assert metrics["likert_missing"] == 2.0
    none_graded = task.aggregate([None] * 2, ["g"] * 2, [scores[1], scores[3]])
    assert math.isnan(none_graded["likert_mean"])
    assert none_graded["likert_graded"] == 0.0 and none_graded["likert_missing"] == 2.0
    with pytest.raises(ValueError, match="no examples"):
        task.aggregate([], [], [])


class RecordingJudge(Judge):
    """Answers from a script; records what it was asked and whether it was closed."""

    instances: list[RecordingJudge] = []  # noqa: RUF012 (a test-only registry)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.items: list[JudgeItem] = []
        self.closed = False
        RecordingJudge.instances.append(self)

    def grade(self, items: Sequence[JudgeItem]) -> tuple[list[int | None], list[str]]:
        self.items.extend(items)
        raw = ["Score: 5" if "gout" in item.summary else "not sure" for item in items]
        return [5 if text == "Score: 5" else None for text in raw], raw

    def close(self) -> None:
        self.closed = True


def test_judge_is_built_lazily_and_freed(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    RecordingJudge.instances.clear()
    monkeypatch.setattr(judge_module, "LocalJudge", RecordingJudge)
    cfg = compose_train(["task=summarization"], cache_dir)
    task = instantiate(cfg.task, _convert_="partial")
    task.load_split("test")
    assert RecordingJudge.instances == []  # a train-only path never builds the judge
    examples = [{"id": str(i), "text": f"note {i}"} for i in range(3)]
    golds = ["man with gout", "woman with cough", "man with asthma"]
    metrics, scores = task.score(examples, ["man with gout", "a cough", None], golds)
    (judge,) = RecordingJudge.instances
    assert judge.closed
    # The empty summary is not sent to the judge; it gets the lowest grade.
    assert [item.summary for item in judge.items] == ["man with gout", "a cough"]
    assert [item.note for item in judge.items] == ["note 0", "note 1"]
    assert [item.reference for item in judge.items] == golds[:2]
    assert [s["likert"] for s in scores] == [5, None, EMPTY_SUMMARY_GRADE]
    assert [s["judge_output"] for s in scores][:2] == ["Score: 5", "not sure"]
    assert metrics["likert_mean"] == pytest.approx(3.0)
    assert metrics["likert_graded"] == 2.0 and metrics["likert_missing"] == 1.0


def test_score_with_the_real_tiny_judge(cache_dir: Path) -> None:
    cfg = compose_train(["task=summarization"], cache_dir)
    task = instantiate(cfg.task, _convert_="partial")
    examples = task.load_split("test")[:4]
    golds = [task.gold(example) for example in examples]
    predictions = [golds[0], "patient with chest pain", None, golds[3][:20]]
    metrics, scores = task.score(examples, predictions, golds)
    assert len(scores) == 4
    assert scores[0]["rougeL"] == pytest.approx(1.0)
    # The empty summary is graded without asking the judge, and says so in the audit trail.
    assert scores[2] == {
        "rougeL": 0.0,
        "likert": EMPTY_SUMMARY_GRADE,
        "judge_output": EMPTY_SUMMARY_NOTE,
    }
    asked = [score for position, score in enumerate(scores) if position != 2]
    # Whatever the random judge said, the grade is what the parser reads in it: none made up.
    assert [score["likert"] for score in asked] == [
        parse_grade(score["judge_output"]) for score in asked
    ]
    assert all(score["judge_output"] != EMPTY_SUMMARY_NOTE for score in asked)
    assert metrics["likert_graded"] + metrics["likert_missing"] == 4.0
    assert set(metrics) == {"rougeL", "likert_mean", "likert_graded", "likert_missing"}


# --------------------------------------------------------------------------- a judge that grades


class ScriptedAnswers:
    """Makes a real causal LM give a scripted answer to each judge prompt. A forward hook
    overwrites the logits of the last position, so that greedy decoding picks the answer's
    next token (then end-of-turn); everything around the model (the judge's prompt building,
    batched generation, decoding, grade parsing) runs for real. The answer is looked up by the
    summary the prompt asks about, so a prompt that lost or swapped its summary fails."""

    def __init__(self, model: Any, tokenizer: Any, answers: dict[str, str]) -> None:
        self.tokenizer = tokenizer
        self.answers = answers
        self.asked: list[str] = []
        self.scripts: list[list[int]] = []
        self.step = 0
        model.register_forward_hook(self.force_next_token, with_kwargs=True)

    def script(self, prompt_ids: list[int]) -> list[int]:
        prompt = self.tokenizer.decode(prompt_ids, skip_special_tokens=True)
        summary = prompt.split("Summary to grade:", 1)[1].split("\n", 1)[0].strip()
        self.asked.append(summary)
        answer = self.tokenizer(self.answers[summary], add_special_tokens=False)["input_ids"]
        return [*answer, self.tokenizer.eos_token_id]

    def force_next_token(
        self, module: Any, args: tuple, kwargs: dict[str, Any], output: Any
    ) -> Any:
        input_ids = kwargs["input_ids"]
        if input_ids.size(1) > 1:  # the whole prompt: a new generate() call starts
            self.scripts = [self.script(row) for row in input_ids.tolist()]
            self.step = 0
        else:  # one new token per step, the KV cache holding the rest
            self.step += 1
        forced = torch.full_like(output.logits[:, -1, :], -1e4)
        for row, script in enumerate(self.scripts):
            forced[row, script[min(self.step, len(script) - 1)]] = 0.0
        output.logits[:, -1, :] = forced
        return output


# Summaries of two runs on the same six notes, and the judge's answer to each.
CONTROL = {
    "54M with chest pain; angina; start aspirin.": "4",
    "Patient seen.": "Score: 2",
    "Cough, maybe bronchitis.": "3 or 4",  # two numbers: no grade
    "": "",  # empty: graded 1 without asking the judge
    "Rash.": "2",
    "40F with cough; bronchitis; fluids and rest.": "3",
}
TREATMENT = {
    "54-year-old man with exertional chest pain, angina, started on aspirin.": "5",
    "Adult with a cough; viral bronchitis; supportive care.": "4",
    "Cough with fever, bronchitis, fluids.": "4",
    "Woman with dysuria, UTI, nitrofurantoin.": "**5**",
    "Contact dermatitis on the hands; topical steroid.": "4/5",
    "The summary.": "I cannot tell",  # no number: no grade
}


def test_grades_of_a_local_judge_model_reach_the_likert_metrics_and_the_wilcoxon_test(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clintune.eval.runner import score_outputs
    from clintune.eval.significance import compare, wilcoxon_signed_rank
    from clintune.models import loading

    judges: list[ScriptedAnswers] = []
    real_load_model = loading.load_model

    def load_scripted_judge(*args: Any, **kwargs: Any) -> Any:
        loaded = real_load_model(*args, **kwargs)
        judges.append(ScriptedAnswers(loaded.model, loaded.tokenizer, {**CONTROL, **TREATMENT}))
        return loaded

    monkeypatch.setattr(loading, "load_model", load_scripted_judge)
    cfg = compose_train(["task=summarization", "task.judge.batch_size=4"], cache_dir)
    task = instantiate(cfg.task, _convert_="partial")
    examples = task.load_split("test")[:6]
    runs = {}
    for name, answers in (("control", CONTROL), ("treatment", TREATMENT)):
        result = score_outputs(task, examples, list(answers), bootstrap={"samples": 20})
        # Through JSON, as the report reads the runs' predictions.jsonl.
        runs[name] = (result.metrics, json.loads(json.dumps(result.predictions)))

    # One local judge model per scored run, asked once about every non-empty summary (in
    # the batches' length order: the grades must come back in the examples' order).
    assert len(judges) == 2
    assert sorted(judges[0].asked) == sorted(summary for summary in CONTROL if summary)
    assert sorted(judges[1].asked) == sorted(TREATMENT)
    assert judges[1].asked != list(TREATMENT)

    control_metrics, control_rows = runs["control"]
    treatment_metrics, treatment_rows = runs["treatment"]
    assert [row["likert"] for row in control_rows] == [4, 2, None, EMPTY_SUMMARY_GRADE, 2, 3]
    assert [row["likert"] for row in treatment_rows] == [5, 4, 4, 5, 4, None]
    assert [row["judge_output"] for row in treatment_rows] == list(TREATMENT.values())
    # Means over the graded summaries only; the missing grade is counted, not filled in.
    assert control_metrics["likert_mean"] == pytest.approx((4 + 2 + 1 + 2 + 3) / 5)
    assert control_metrics["likert_graded"] == 5.0 and control_metrics["likert_missing"] == 1.0
    assert treatment_metrics["likert_mean"] == pytest.approx((5 + 4 + 4 + 5 + 4) / 5)
    assert treatment_metrics["likert_graded"] == 5.0
    assert treatment_metrics["likert_missing"] == 1.0
    assert treatment_metrics["likert_mean_n"] == 5.0

    # The report's paired test: Wilcoxon on the four notes graded in both runs.
    outcome = compare("likert_mean", control_rows, treatment_rows)
    assert outcome == wilcoxon_signed_rank([4, 2, None, 1, 2, 3], [5, 4, 4, 5, 4, None])
    assert (outcome.n, outcome.n_dropped) == (4, 2)
    assert outcome.effect == pytest.approx((5 + 4 + 5 + 4) / 4 - (4 + 2 + 1 + 2) / 4)
    expected = stats.wilcoxon([5, 4, 5, 4], [4, 2, 1, 2], zero_method="pratt")
    assert outcome.p_value == pytest.approx(expected.pvalue)
