"""The one evaluation path used by train.py and evaluate.py: encode prompts, generate, parse,
score, and turn the result into the run directory's rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clintune.eval.generation import generate_greedy
from clintune.tasks.base import Task
from clintune.tokenization import encode_prompt


@dataclass
class EvalResult:
    metrics: dict[str, float]  # keys without the "test/" prefix
    predictions: list[dict[str, Any]]
    truncated_prompts: int = 0
    inputs: list[str] = field(default_factory=list)


def evaluate_task(
    model: Any,
    tokenizer: Any,
    task: Task,
    examples: list[dict[str, Any]],
    *,
    max_prompt_length: int,
    batch_size: int,
    show_progress: bool = True,
) -> EvalResult:
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
    parsed = [task.parse(output) for output in outputs]
    golds = [task.gold(example) for example in examples]
    metrics, per_example = task.score(parsed, golds)
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
