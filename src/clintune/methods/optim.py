"""What every method's LightningModule shares: AdamW with linear warm-up then cosine decay,
compute counters that survive a resume, and the FSDP2 plan applied in ``configure_model``."""

from __future__ import annotations

from typing import Any

import torch
from transformers import get_cosine_schedule_with_warmup

from clintune import distributed


def adamw_warmup_cosine(
    model: torch.nn.Module,
    *,
    learning_rate: float,
    weight_decay: float,
    warmup_ratio: float,
    betas: tuple[float, float],
    total_steps: int,
) -> dict[str, Any]:
    """Lightning's optimiser dict; norms and biases are not decayed."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim < 2 or "norm" in name else decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=learning_rate,
        betas=betas,
    )
    total_steps = max(1, total_steps)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, int(warmup_ratio * total_steps), total_steps
    )
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
    }


class WarmupCosineAdamW:
    """LightningModule mixin: ``configure_optimizers`` from the module's ``model``,
    ``learning_rate``, ``weight_decay``, ``warmup_ratio`` and ``betas``."""

    model: torch.nn.Module
    learning_rate: float
    weight_decay: float
    warmup_ratio: float
    betas: tuple[float, float]
    trainer: Any

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_warmup_cosine(
            self.model,
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            warmup_ratio=self.warmup_ratio,
            betas=self.betas,
            total_steps=int(self.trainer.estimated_stepping_batches),
        )


class ComputeCounters:
    """LightningModule mixin: tokens trained on (and padding, and reference-pass tokens),
    summed over the whole fit and kept in training checkpoints, so a resumed stage reports
    what it cost in total."""

    COUNTERS = ("tokens_trained", "padding_tokens_trained", "reference_tokens")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tokens_trained = 0
        self.padding_tokens_trained = 0
        self.reference_tokens = 0

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Every rank counts only its own share, and only rank zero writes the checkpoint: it
        # keeps every rank's counters (all ranks save together, so the gather is safe here).
        own = {name: getattr(self, name) for name in self.COUNTERS}
        checkpoint["clintune_counters"] = distributed.gather_to_all(own)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("clintune_counters", {})
        if isinstance(saved, dict):  # written by one process before counters were per rank
            saved = [saved]
        if len(saved) == distributed.world_size():
            own = saved[distributed.rank()]
        else:  # another number of processes: rank zero carries the totals
            totals = {name: sum(int(rank.get(name, 0)) for rank in saved) for name in self.COUNTERS}
            own = totals if distributed.is_rank_zero() else {}
        for name, value in own.items():
            setattr(self, name, value)


class ShardableModel:
    """LightningModule mixin: under ``trainer=fsdp``/``fsdp_cpu`` (``ShardedStrategy``), the
    sharding plan is applied to ``model`` and to any frozen model the method runs beside it
    (``frozen_models``, the DPO reference copy); with any other strategy, nothing happens."""

    model: torch.nn.Module
    trainer: Any

    def frozen_models(self) -> list[torch.nn.Module]:
        return []

    def configure_model(self) -> None:
        from clintune.sharding import ShardedStrategy

        strategy = self.trainer.strategy
        if not isinstance(strategy, ShardedStrategy):
            return
        strategy.shard(self.model)
        for frozen in self.frozen_models():
            strategy.shard(frozen, frozen=True)
