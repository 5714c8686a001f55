"""Supervised fine-tuning: next-token cross-entropy on the completion tokens only."""

from __future__ import annotations

import lightning as L
import torch
from torchmetrics.aggregation import MeanMetric

from clintune.methods.logprobs import DEFAULT_CHUNK_SIZE, sequence_token_logps
from clintune.methods.losses import completion_token_count
from clintune.methods.optim import ComputeCounters, ShardableModel, WarmupCosineAdamW
from clintune.sharding import call_in_root_forward


class SFTModule(ComputeCounters, WarmupCosineAdamW, ShardableModel, L.LightningModule):
    """Wraps a Hugging Face causal LM (full or LoRA); optimisation settings come from config,
    precision, clipping and accumulation from the Trainer."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        learning_rate: float,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        logits_chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__()
        # from_pretrained returns eval mode, and Lightning keeps modules in the mode it finds.
        self.model = model.train()
        self.learning_rate = float(learning_rate)
        self.weight_decay = float(weight_decay)
        self.warmup_ratio = float(warmup_ratio)
        self.betas = tuple(betas)
        self.eval_loss = MeanMetric()
        self.logits_chunk_size = int(logits_chunk_size)

    def _completion_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Log-probs of every completion token of the batch, without full-vocabulary logits
        (inside the root's forward, where a sharded model's LM head is gathered)."""
        logps, _, _ = call_in_root_forward(
            self.model,
            sequence_token_logps,
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            self.logits_chunk_size,
        )
        return logps

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # Normalised by the completion tokens of the global batch (all ranks), times the world
        # size because DDP averages gradients: so 1 and N processes take the same step.
        tokens = completion_token_count(batch["labels"])
        if not tokens:
            raise ValueError("the batch has no completion tokens to train on")
        world = self.trainer.world_size
        if world > 1:
            tokens = self.trainer.strategy.reduce(tokens.float(), reduce_op="sum") / world
        loss = -self._completion_logps(batch).sum() / tokens
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"SFT loss is {loss.item()} at global step {self.global_step} (batch {batch_idx});"
                " stopping before it corrupts the weights. Lower method.learning_rate or check"
                " the precision setting."
            )
        real = int(batch["attention_mask"].sum())
        self.tokens_trained += real
        self.padding_tokens_trained += batch["attention_mask"].numel() - real
        # sync_dist: the mean over ranks of these shares is the global batch's loss.
        self.log(
            "train/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].size(0)
        )
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        tokens = completion_token_count(batch["labels"])
        # Token-weighted over the whole validation set and all ranks, so the value does not
        # depend on how examples fall into batches or ranks.
        loss = -self._completion_logps(batch).sum() / tokens
        self.eval_loss.update(loss, weight=tokens)
        self.log("eval/loss", self.eval_loss, prog_bar=True)
