"""A task defined by its config alone (``task=custom``): the prompt, the answer fields and
their types, and the metrics, with no Python to write.

- **Prompt:** ``prompt`` is a Jinja template over the record's fields (rendered as the one
  user turn), or, when it is null, the record's own ``messages`` list (TRL's conversational
  format: ``[{"role": "system"|"user"|"assistant", "content": …}]``); a trailing assistant
  turn there is the answer when the record has no answer field.
- **Answers:** ``answers`` maps each answer field to its type: ``label`` (one of ``labels``),
  ``letter`` (one of ``letters``, the options in ``options_field``) or ``text`` (free text).
  One answer is written bare; several as ``field: value; field: value``.
- **Metrics:** per answer, from accuracy, macro-F1 with per-class F1, exact match and
  ROUGE-L; the report's paired test follows from each metric's name.

Parsing and metrics are the task families' own (``parse_label``, ``parse_part``,
``parse_letter``, ``normalise_answer``, ``label_metrics``, ``rouge_l``), so a custom task
that asks what a shipped task asks scores exactly as that task does.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf

from clintune.eval.metrics import label_metrics
from clintune.settings import AnswerSettings, custom_task_settings
from clintune.tasks.base import Task
from clintune.tasks.classification import parse_label
from clintune.tasks.data import FieldSpec
from clintune.tasks.reasoning import CheckedFieldSpec, check_options, normalise_answer, parse_letter
from clintune.tasks.summarization import rouge_l
from clintune.tasks.triage import parse_part

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class PresentFieldSpec(FieldSpec):
    """A field the prompt template reads: any JSON value but null or an empty string."""

    type: type = object

    def check(self, value: Any) -> str | None:
        if value is None:
            return "expected a value, got null"
        if isinstance(value, str) and not value.strip():
            return "expected non-empty string"
        return None


def check_messages(messages: Any) -> str | None:
    """Why a ``messages`` list is not a conversation to prompt with, or None."""
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"}:
            return f"message {i}: expected {{'role': …, 'content': …}}, got {message!r:.60}"
        if message.get("role") not in ROLES:
            return f"message {i}: role must be one of {list(ROLES)}, got {message.get('role')!r}"
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            return f"message {i}: expected non-empty string content"
    prompt = prompt_messages(messages)
    if not prompt or prompt[-1]["role"] != "user":
        return "expected a user turn last (after any trailing assistant answer)"
    return None


def prompt_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation up to the answer: a trailing assistant turn is the answer, not prompt."""
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else list(messages)


def format_answers(values: dict[str, str]) -> str:
    """Several answers in one completion, each after its field name."""
    return "; ".join(f"{name}: {value}" for name, value in values.items())


def keyed_value(output: str, name: str, names: list[str]) -> str | None:
    """The text after ``name:`` up to the next answer's key, a semicolon or a line end."""
    others = "|".join(re.escape(other) for other in names if other != name)
    stop = rf"(?=;|\n|$|\b(?:{others})\s*:)" if others else r"(?=;|\n|$)"
    match = re.search(rf"(?<![\w-]){re.escape(name)}\s*[:=]\s*(.*?){stop}", output, re.I)
    return match.group(1).strip() if match else None


class CustomTask(Task):
    # Class-level defaults for code that reads the class; an instance's come from its config
    # (``headline_for_config`` for code that has the config but no instance).
    headline_metric: ClassVar[str] = "accuracy"

    def __init__(
        self,
        *,
        answers: DictConfig | dict[str, Any],
        prompt: str | None = None,
        headline: str | None = None,
        correct_rouge_l: float = 0.5,
        instruction: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__(instruction=instruction, **kwargs)
        self.settings = custom_task_settings(
            {
                "answers": answers,
                "prompt": prompt,
                "headline": headline,
                "correct_rouge_l": correct_rouge_l,
            }
        )
        self.answers: dict[str, AnswerSettings] = self.settings.answers
        self.answer_names = list(self.answers)
        self.several = len(self.answers) > 1
        self.headline_metric = self.settings.headline_metric()  # type: ignore[misc]
        self.template: Any = None
        self.template_fields: set[str] = set()
        if prompt is None:
            self._schema = self._build_schema()
        else:
            from jinja2 import StrictUndefined, meta
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            environment = ImmutableSandboxedEnvironment(undefined=StrictUndefined)
            self.template = environment.from_string(prompt)
            # "id" keeps its own spec (a unique string) even when the template shows it.
            self.template_fields = meta.find_undeclared_variables(environment.parse(prompt))
            self.template_fields.discard("id")
        self._schema = self._build_schema()

    @classmethod
    def headline_for_config(cls, task_cfg: Any) -> str:
        container = (
            OmegaConf.to_container(task_cfg) if isinstance(task_cfg, DictConfig) else task_cfg
        )
        return custom_task_settings(container).headline_metric()

    # ---- data -------------------------------------------------------------------------------

    def schema(self) -> dict[str, FieldSpec]:
        return dict(self._schema)

    def _build_schema(self) -> dict[str, FieldSpec]:
        schema: dict[str, FieldSpec] = {
            name: PresentFieldSpec(description="read by the prompt template")
            for name in sorted(self.template_fields)
        }
        if self.template is None:
            schema["messages"] = CheckedFieldSpec(
                list, description="the conversation (role, content)", extra_check=check_messages
            )
        # The answer may be the conversation's last assistant turn instead (one answer only).
        answer_required = self.template is not None or self.several
        for name, answer in self.answers.items():
            allowed = tuple(answer.label_set()) if answer.type != "text" else None
            schema[name] = FieldSpec(
                str, allowed=allowed, required=answer_required, description=f"{answer.type} answer"
            )
            if answer.type == "letter":
                schema[self.options_field(answer)] = CheckedFieldSpec(
                    dict,
                    description="option letter → option text",
                    extra_check=check_options(answer.label_set()),
                )
        return schema

    def options_field(self, answer: AnswerSettings) -> str:
        return answer.options_field or "options"

    def check_record(self, record: dict[str, Any]) -> list[str]:
        problems: list[str] = []
        if self.template is not None:
            from jinja2 import TemplateError

            try:
                self.template.render(**record)
            except TemplateError as error:
                problems.append(f"field 'prompt' (the template): {error}")
        name = self.answer_names[0]
        if not self.several and name not in record:
            # The answer is the last assistant turn: it must be one of the allowed values.
            messages = record.get("messages") or []
            if not messages or messages[-1]["role"] != "assistant":
                problems.append(f"field '{name}': missing (and no assistant turn ends 'messages')")
            else:
                reason = self._schema[name].check(messages[-1]["content"].strip())
                if reason:
                    problems.append(f"field 'messages' (its last assistant turn): {reason}")
        for answer_name, answer in self.answers.items():
            options = record.get(self.options_field(answer))
            gold = self.answer_value(record, answer_name)
            if answer.type == "letter" and isinstance(options, dict) and gold not in options:
                problems.append(f"field '{answer_name}': {gold!r} is not an option letter")
        return problems

    def answer_value(self, example: dict[str, Any], name: str) -> str:
        if name in example:
            return str(example[name])
        return example["messages"][-1]["content"].strip()

    # ---- prompt and target ------------------------------------------------------------------

    def messages(self, example: dict[str, Any]) -> list[dict[str, str]]:
        if self.template is None:
            return [dict(m) for m in prompt_messages(example["messages"])]
        content = self.template.render(**example).strip()
        if self.instruction:
            content = f"{self.instruction}\n\n{content}"
        return [{"role": "user", "content": content}]

    def input_text(self, example: dict[str, Any]) -> str:
        return "\n\n".join(m["content"] for m in self.messages(example))

    def target_text(self, example: dict[str, Any]) -> str:
        if not self.several:
            return self.answer_value(example, self.answer_names[0])
        return format_answers({name: self.answer_value(example, name) for name in self.answers})

    def gold(self, example: dict[str, Any]) -> Any:
        golds = {name: self.answer_value(example, name) for name in self.answers}
        return golds if self.several else golds[self.answer_names[0]]

    def wrong_answers(self, example: dict[str, Any]) -> list[str]:
        """Every other combination of the closed answers (labels, letters), the gold one left
        out; none when an answer is free text."""
        if any(answer.type == "text" for answer in self.answers.values()):
            return []
        gold = self.gold(example)
        choices = [answer.label_set() for answer in self.answers.values()]
        if not self.several:
            return [value for value in choices[0] if value != gold]
        wrong = []
        for values in itertools.product(*choices):
            combination = dict(zip(self.answer_names, values, strict=True))
            if combination != gold:
                wrong.append(format_answers(combination))
        return wrong

    # ---- parsing ----------------------------------------------------------------------------

    def parse_one(
        self, output: str, name: str, answer: AnswerSettings, example: dict[str, Any] | None
    ) -> str | None:
        if self.several:
            if answer.type == "label":
                return parse_part(output, (name, name.replace("_", " ")), answer.label_set())
            segment = keyed_value(output, name, self.answer_names)
            if segment is None:
                return None
            output = segment
        if answer.type == "label":
            return parse_label(output, answer.label_set())
        if answer.type == "letter":
            options = example.get(self.options_field(answer)) if example else None
            return parse_letter(output, answer.label_set(), options)
        text = output.strip()
        return text or None

    def parse(self, output: str, example: dict[str, Any] | None = None) -> Any | None:
        parsed = {
            name: self.parse_one(output, name, answer, example)
            for name, answer in self.answers.items()
        }
        if not self.several:
            return parsed[self.answer_names[0]]
        return None if all(value is None for value in parsed.values()) else parsed

    # ---- scoring ----------------------------------------------------------------------------

    def _part(self, value: Any, name: str) -> Any:
        return (value or {}).get(name) if self.several else value

    def _score_key(self, name: str, score: str) -> str:
        return f"{name}_{score}" if self.several else score

    def score_examples(
        self, examples: list[dict[str, Any]], predictions: list[Any | None], golds: list[Any]
    ) -> list[dict[str, Any]]:
        scores = []
        for prediction, gold in zip(predictions, golds, strict=True):
            row: dict[str, Any] = {}
            for name, answer in self.answers.items():
                said, wanted = self._part(prediction, name), self._part(gold, name)
                if answer.type == "text":
                    correct = said is not None and normalise_answer(said) == normalise_answer(
                        wanted
                    )
                    if "rougeL" in answer.metric_names():
                        row[self._score_key(name, "rougeL")] = rouge_l(said, wanted)
                else:
                    correct = said is not None and said == wanted
                row[self._score_key(name, "correct")] = bool(correct)
            if self.several:
                row["correct"] = all(row[f"{name}_correct"] for name in self.answers)
            scores.append(row)
        return scores

    def is_correct(self, example: dict[str, Any], output: str) -> bool:
        # On-policy pairs: a free-text sample counts as right by ROUGE-L, as summarisation's
        # do, when ROUGE-L is one of its metrics; otherwise by exact match.
        if not self.several and self.answers[self.answer_names[0]].type == "text":
            answer = self.answers[self.answer_names[0]]
            if "rougeL" in answer.metric_names():
                said = self.parse(output, example)
                return rouge_l(said, self.gold(example)) >= self.settings.correct_rouge_l
        return super().is_correct(example, output)

    def aggregate(
        self, predictions: list[Any | None], golds: list[Any], scores: list[dict[str, Any]]
    ) -> dict[str, float]:
        if not scores:
            raise ValueError("no examples to score")
        metrics: dict[str, float] = {}
        for name, answer in self.answers.items():
            wanted = answer.metric_names()
            prefix = f"{name}_" if self.several else ""
            correct = [bool(s[self._score_key(name, "correct")]) for s in scores]
            share_correct = sum(correct) / len(correct)
            if answer.type == "label" or "f1_macro" in wanted:
                # label_metrics, as the classification and triage tasks compute them (its
                # accuracy is torchmetrics', in float32: the same number to the last bit).
                parts = label_metrics(
                    [self._part(p, name) for p in predictions],
                    [self._part(g, name) for g in golds],
                    answer.label_set(),
                )
                if "f1_macro" in wanted:
                    metrics[f"{prefix}f1_macro"] = parts["f1_macro"]
                    for key, value in parts.items():
                        if key.startswith("f1_class_"):
                            metrics[f"{prefix}{key}"] = value
                if answer.type == "label":
                    share_correct = parts["accuracy"]
            if "accuracy" in wanted:
                metrics[f"{prefix}accuracy"] = share_correct
            if "exact_match" in wanted:
                metrics[f"{prefix}exact_match"] = sum(correct) / len(correct)
            if "rougeL" in wanted:
                values = [float(s[self._score_key(name, "rougeL")]) for s in scores]
                metrics[f"{prefix}rougeL"] = sum(values) / len(values)
        if self.several and "exact_match" not in metrics:
            metrics["exact_match"] = sum(bool(s["correct"]) for s in scores) / len(scores)
        return metrics
