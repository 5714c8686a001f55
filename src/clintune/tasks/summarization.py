"""Summarization: a clinical note → a one-sentence summary, scored by ROUGE-L against the
reference and by a 1–5 Likert judge (see clintune.eval.judge)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig

from clintune.eval.judge import Judge, JudgeItem, build_judge
from clintune.tasks.base import Task
from clintune.tasks.data import FieldSpec

# An empty summary is the worst possible one; grading it 1 without asking the judge keeps a
# model that writes nothing from escaping the Likert mean (as "missing" it would not count).
EMPTY_SUMMARY_GRADE = 1
EMPTY_SUMMARY_NOTE = "(no summary was generated: lowest grade, judge not asked)"


def rouge_l(prediction: str | None, reference: str) -> float:
    """ROUGE-L F-measure of one prediction; None (nothing generated) scores 0."""
    if prediction is None:
        return 0.0
    from torchmetrics.functional.text.rouge import rouge_score

    # rougeL with torchmetrics' default normaliser and whitespace tokenizer and no stemmer
    # needs no NLTK data, so it runs offline (only rougeLsum wants the punkt download).
    result = rouge_score(prediction, reference, rouge_keys="rougeL", use_stemmer=False)
    return float(result["rougeL_fmeasure"])


class SummarizationTask(Task):
    headline_metric: ClassVar[str] = "rougeL"
    count_metrics: ClassVar[frozenset[str]] = frozenset({"likert_graded", "likert_missing"})

    def __init__(
        self,
        *,
        judge: DictConfig | Mapping[str, Any] | None = None,
        cache_dir: str | Path | None = None,
        correct_rouge_l: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.judge_cfg = judge
        self.correct_rouge_l = float(correct_rouge_l)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None

    def schema(self) -> dict[str, FieldSpec]:
        return {
            "text": FieldSpec(str, description="the clinical note"),
            "summary": FieldSpec(str, description="the reference summary"),
        }

    def input_text(self, example: dict[str, Any]) -> str:
        return example["text"]

    def target_text(self, example: dict[str, Any]) -> str:
        return example["summary"]

    def gold(self, example: dict[str, Any]) -> str:
        return example["summary"]

    def parse(self, output: str, example: dict[str, Any] | None = None) -> str | None:
        text = output.strip()
        return text or None

    def is_correct(self, example: dict[str, Any], output: str) -> bool:
        # No judge per sample (too slow for on-policy pairs): ROUGE-L against the reference.
        return rouge_l(self.parse(output, example), example["summary"]) >= self.correct_rouge_l

    def make_judge(self) -> Judge:
        # Built on demand, so that a run that only trains never loads a judge model.
        if self.cache_dir is None and self.judge_cfg is not None:
            kind = str(self.judge_cfg.get("kind") or "none")
            if kind == "local":
                raise ValueError(f"task '{self.name}' needs cache_dir for a local judge model")
        return build_judge(self.judge_cfg, self.cache_dir or Path("."))

    def judge_grades(
        self, examples: list[dict[str, Any]], predictions: list[str | None], golds: list[str]
    ) -> tuple[list[int | None], list[str]]:
        grades: list[int | None] = [None] * len(examples)
        raw: list[str] = [""] * len(examples)
        judge = self.make_judge()
        try:
            asked = [i for i, prediction in enumerate(predictions) if prediction is not None]
            items = [
                JudgeItem(
                    note=self.input_text(examples[i]),
                    summary=str(predictions[i]),
                    reference=golds[i],
                )
                for i in asked
            ]
            asked_grades, asked_raw = judge.grade(items) if items else ([], [])
        finally:
            # A local judge holds a whole model: free it before the bootstrap and the next run.
            judge.close()
        for i, grade, text in zip(asked, asked_grades, asked_raw, strict=True):
            grades[i], raw[i] = grade, text
        judged = self.judge_cfg is not None and str(self.judge_cfg.get("kind") or "none") != "none"
        if judged:
            for i, prediction in enumerate(predictions):
                if prediction is None:
                    grades[i], raw[i] = EMPTY_SUMMARY_GRADE, EMPTY_SUMMARY_NOTE
        return grades, raw

    def score_examples(
        self, examples: list[dict[str, Any]], predictions: list[Any | None], golds: list[Any]
    ) -> list[dict[str, Any]]:
        if not len(examples) == len(predictions) == len(golds):
            raise ValueError(
                f"{len(examples)} examples, {len(predictions)} predictions, {len(golds)} golds"
            )
        grades, raw = self.judge_grades(examples, predictions, golds)
        return [
            {"rougeL": rouge_l(prediction, gold), "likert": grade, "judge_output": text}
            for prediction, gold, grade, text in zip(predictions, golds, grades, raw, strict=True)
        ]

    def headline_value(self, examples: list[dict[str, Any]], outputs: list[str]) -> float:
        # ROUGE-L only: the judge is for the test split, not for every validation.
        scores = [
            rouge_l(self.parse(output, example), self.gold(example))
            for output, example in zip(outputs, examples, strict=True)
        ]
        return sum(scores) / len(scores)

    def metric_support(self, scores: list[dict[str, Any]]) -> dict[str, int]:
        return {"likert_mean": sum(score["likert"] is not None for score in scores)}

    def aggregate(
        self, predictions: list[Any | None], golds: list[Any], scores: list[dict[str, Any]]
    ) -> dict[str, float]:
        if not scores:
            raise ValueError("no examples to score")
        graded = [int(s["likert"]) for s in scores if s.get("likert") is not None]
        return {
            "rougeL": sum(float(s["rougeL"]) for s in scores) / len(scores),
            # Missing grades are left out and counted, never filled with a middle grade.
            "likert_mean": sum(graded) / len(graded) if graded else math.nan,
            "likert_graded": float(len(graded)),
            "likert_missing": float(len(scores) - len(graded)),
        }
