"""The task's headline metric on the validation split during training, for
``method.save=best_metric``: at each validation every rank generates greedily for its share
of the validation examples, the outputs are gathered, and the metric is logged as
``eval/<headline>`` (e.g. ``eval/f1_macro``) for ``SaveWeights`` to pick the weights by.

It costs one greedy generation pass over the validation split per validation, on top of the
loss pass: about what evaluating that many test examples costs."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from clintune import distributed
from clintune.eval.runner import generate_outputs
from clintune.tasks.base import Task


def monitor_for(save: str, task: Task) -> str:
    """What ``SaveWeights`` watches: ``eval/loss``, or the task's headline on val."""
    return f"eval/{task.headline_metric}" if save == "best_metric" else "eval/loss"


class ValidationMetric(Callback):
    """Logs ``eval/<headline metric>`` over ``examples`` at the end of each validation.

    Listed before ``SaveWeights`` among the trainer's callbacks, so that the value is in
    ``trainer.callback_metrics`` when ``SaveWeights`` reads it at ``on_validation_end``."""

    def __init__(
        self,
        task: Task,
        examples: list[dict[str, Any]],
        tokenizer: Any,
        *,
        max_prompt_length: int,
        batch_size: int,
    ) -> None:
        self.task = task
        self.examples = examples
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        self.batch_size = batch_size
        self.key = f"eval/{task.headline_metric}"
        self.history: list[tuple[int, float]] = []  # (global step, value), for tests and logs

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        outputs, _ = generate_outputs(
            module.model,
            self.tokenizer,
            self.task,
            distributed.my_shard(self.examples),
            max_prompt_length=self.max_prompt_length,
            batch_size=self.batch_size,
            show_progress=False,
        )
        gathered = [output for shard in distributed.gather_to_all(outputs) for output in shard]
        value = self.task.headline_value(self.examples, gathered)
        self.history.append((trainer.global_step, value))
        # Every rank computed the same value from the same gathered outputs; sync_dist only
        # averages equal numbers (and keeps Lightning from warning about epoch-level logs).
        module.log(self.key, value, prog_bar=True, batch_size=len(self.examples), sync_dist=True)
