"""The one evaluation path used by train.py and evaluate.py: encode prompts, generate, parse,
score, and turn the result into the run directory's rows."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clintune.eval.generation import generate_greedy
from clintune.eval.metrics import MACRO_F1_RULE, undefined_class_f1
from clintune.eval.statistics import bootstrap_intervals
from clintune.tasks.base import Task
from clintune.tokenization import encode_prompt

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    metrics: dict[str, float]  # keys without the "test/" prefix
    predictions: list[dict[str, Any]]
    truncated_prompts: int = 0
    inputs: list[str] = field(default_factory=list)


def with_intervals(
    task: Task,
    parsed: list[Any],
    golds: list[Any],
    scores: list[dict[str, Any]],
    metrics: dict[str, float],
    *,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """``<metric>_ci_low``/``_ci_high`` from a bootstrap over examples, and ``<metric>_n``."""

    def metrics_of(indices: np.ndarray) -> dict[str, float]:
        return task.aggregate(
            [parsed[i] for i in indices], [golds[i] for i in indices], [scores[i] for i in indices]
        )

    intervals = bootstrap_intervals(
        len(parsed),
        metrics_of,
        n_resamples=int(samples),
        confidence=float(confidence),
        seed=int(seed),
    )
    support = task.metric_support(scores)
    extra: dict[str, float] = {}
    for key in metrics:
        if key in task.count_metrics:
            continue
        low, high = intervals.get(key, (float("nan"), float("nan")))
        extra[f"{key}_ci_low"] = low
        extra[f"{key}_ci_high"] = high
        extra[f"{key}_n"] = float(support.get(key, len(parsed)))
    return extra


def generate_outputs(
    model: Any,
    tokenizer: Any,
    task: Task,
    examples: list[dict[str, Any]],
    *,
    max_prompt_length: int,
    batch_size: int,
    show_progress: bool = True,
) -> tuple[list[str], int]:
    """Greedy outputs for ``examples`` (a rank's shard, or all), and how many prompts were cut."""
    prompts: list[list[int]] = []
    truncated = 0
    for example in examples:
        ids = encode_prompt(tokenizer, task.messages(example))
        if len(ids) > max_prompt_length:
            # Keep the end: it holds the generation prompt the model must continue from.
            ids = ids[-max_prompt_length:]
            truncated += 1
        prompts.append(ids)
    outputs = generate_greedy(
        model,
        tokenizer,
        prompts,
        max_new_tokens=task.max_new_tokens,
        batch_size=batch_size,
        show_progress=show_progress,
    )
    return outputs, truncated


def score_outputs(
    task: Task,
    examples: list[dict[str, Any]],
    outputs: list[str],
    *,
    truncated: int = 0,
    bootstrap: dict[str, Any] | None = None,
) -> EvalResult:
    """Parse, score and bootstrap the outputs of all ``examples``."""
    parsed = [
        task.parse(output, example) for output, example in zip(outputs, examples, strict=True)
    ]
    golds = [task.gold(example) for example in examples]
    metrics, per_example = task.score(examples, parsed, golds)
    undefined = undefined_class_f1(metrics)
    if undefined:
        log.warning(
            "%s: no test example has this class, so its F1 is undefined (NaN); %s",
            ", ".join(undefined),
            MACRO_F1_RULE,
        )
    metrics.update(with_intervals(task, parsed, golds, per_example, metrics, **(bootstrap or {})))
    metrics["n"] = float(len(examples))
    metrics["unparseable"] = float(sum(p is None for p in parsed))
    metrics["truncated_prompts"] = float(truncated)
    rows = [
        {"id": example["id"], "output": output, "prediction": prediction, "target": gold, **scores}
        for example, output, prediction, gold, scores in zip(
            examples, outputs, parsed, golds, per_example, strict=True
        )
    ]
    return EvalResult(
        metrics=metrics,
        predictions=rows,
        truncated_prompts=truncated,
        inputs=[task.input_text(example) for example in examples],
    )
