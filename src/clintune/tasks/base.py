"""What every task provides: a schema, prompts, targets, a parser and metrics.

A new task is a subclass here plus a YAML file in conf/task/ whose ``_target_`` names it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf

from clintune.tasks.data import FieldSpec, load_hub_split, load_records

SPLITS = ("train", "val", "test")


class Task(ABC):
    """Base class. ``data`` holds the split paths, a ``field_map`` and the
    ``contains_sensitive_text`` flag (see ``clintune.privacy``)."""

    #: the metric printed at the end of a run and used to rank runs
    headline_metric: ClassVar[str]
    #: metrics that count examples: reported as they are, with no confidence interval
    count_metrics: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self,
        name: str,
        data: DictConfig | dict[str, Any],
        instruction: str,
        max_new_tokens: int = 16,
    ) -> None:
        self.name = name
        self.data = OmegaConf.create(data) if isinstance(data, dict) else data
        self.instruction = instruction.strip()
        self.max_new_tokens = int(max_new_tokens)

    @abstractmethod
    def schema(self) -> dict[str, FieldSpec]:
        """The JSONL fields besides ``id``."""

    @abstractmethod
    def input_text(self, example: dict[str, Any]) -> str:
        """The text the model reads (also what the leakage check compares)."""

    @abstractmethod
    def target_text(self, example: dict[str, Any]) -> str:
        """The gold completion, exactly as the model should write it."""

    @abstractmethod
    def gold(self, example: dict[str, Any]) -> Any:
        """The gold answer in the form ``parse`` returns."""

    @abstractmethod
    def parse(self, output: str, example: dict[str, Any] | None = None) -> Any | None:
        """The answer in a generated text, or None if there is none. ``example`` lets a
        parser use the example's own context, e.g. match an answer to its option texts."""

    def wrong_answers(self, example: dict[str, Any]) -> list[str]:
        """Target texts of wrong answers (other labels, distractor options): the rejected
        side of label-based preference pairs. Tasks without a closed answer set return []."""
        return []

    def is_correct(self, example: dict[str, Any], output: str) -> bool:
        """Whether a generated output is right by the task's own metric (on-policy pairs)."""
        prediction = self.parse(output, example)
        scores = self.score_examples([example], [prediction], [self.gold(example)])
        return bool(scores[0].get("correct", False))

    def check_record(self, record: dict[str, Any]) -> list[str]:
        """Problems that involve several fields of one valid-looking record."""
        return []

    @abstractmethod
    def score_examples(
        self, examples: list[dict[str, Any]], predictions: list[Any | None], golds: list[Any]
    ) -> list[dict[str, Any]]:
        """Per-example scores (e.g. ``correct``), written to predictions.jsonl and resampled
        by the bootstrap; the expensive work (ROUGE, a judge model) belongs here."""

    @abstractmethod
    def aggregate(
        self, predictions: list[Any | None], golds: list[Any], scores: list[dict[str, Any]]
    ) -> dict[str, float]:
        """Metrics (keys without ``test/``) over any subset of examples; called once per
        bootstrap resample, so it must be cheap given ``scores``."""

    @classmethod
    def headline_for_config(cls, task_cfg: Any) -> str:
        """The headline metric a task config would have, without building the task (no data
        is loaded). A task whose headline depends on its config overrides this."""
        return cls.headline_metric

    def headline_value(self, examples: list[dict[str, Any]], outputs: list[str]) -> float:
        """The headline metric of raw outputs (no intervals): what ``method.save=best_metric``
        picks the weights by on the validation split. Tasks whose scoring does more than the
        headline needs (a judge model) override this with the cheap part."""
        predictions = [self.parse(output, ex) for output, ex in zip(outputs, examples, strict=True)]
        golds = [self.gold(example) for example in examples]
        metrics, _ = self.score(examples, predictions, golds)
        return float(metrics[self.headline_metric])

    def metric_support(self, scores: list[dict[str, Any]]) -> dict[str, int]:
        """How many examples a metric is over, where that is not all of them (a judge's
        grades, say). Metrics left out are over every test example."""
        return {}

    def score(
        self, examples: list[dict[str, Any]], predictions: list[Any | None], golds: list[Any]
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        scores = self.score_examples(examples, predictions, golds)
        return self.aggregate(predictions, golds, scores), scores

    def messages(self, example: dict[str, Any]) -> list[dict[str, str]]:
        # One user turn only: Mistral's template rejects a system role.
        return [{"role": "user", "content": f"{self.instruction}\n\n{self.input_text(example)}"}]

    def split_path(self, split: str) -> Path:
        path = self.data.get(split)
        if not path:
            raise ValueError(f"task '{self.name}' has no task.data.{split} path")
        return Path(str(path))

    def load_split(self, split: str) -> list[dict[str, Any]]:
        """A validated split: from ``task.data.hub`` when set, else from the split's file."""
        # Any task's data may carry a dispreferred answer for DPO.
        schema = {**self.schema(), "rejected": FieldSpec(str, required=False)}
        field_map = {str(k): str(v) for k, v in (self.data.get("field_map") or {}).items()}
        value_map = OmegaConf.to_container(self.data.get("value_map") or OmegaConf.create({}))
        hub = self.data.get("hub")
        if hub:
            hub_split = (hub.get("splits") or {}).get(split, split)
            return load_hub_split(
                str(hub.dataset),
                str(hub_split),
                schema,
                field_map,
                value_map,  # type: ignore[arg-type]
                subset=hub.get("subset"),
                id_field=hub.get("id_field"),
                record_check=self.check_record,
            )
        return load_records(
            self.split_path(split),
            schema,
            field_map,
            value_map,
            self.check_record,  # type: ignore[arg-type]
        )


def headline_record(cfg: DictConfig) -> dict[str, Any]:
    """The task's headline metric and count metrics, from its class (no data is loaded), for
    ``job.json`` and the W&B config: the report reads them there."""
    from hydra.utils import get_class

    task_class = get_class(str(cfg.task._target_))
    return {
        "headline_metric": f"test/{task_class.headline_for_config(cfg.task)}",
        "count_metrics": sorted(task_class.count_metrics),
    }
