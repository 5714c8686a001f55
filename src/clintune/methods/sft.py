"""Supervised fine-tuning: next-token cross-entropy on the completion tokens only."""

from __future__ import annotations

import lightning as L
import torch

from clintune.methods.losses import sft_loss
from clintune.methods.optim import WarmupCosineAdamW


class SFTModule(WarmupCosineAdamW, L.LightningModule):
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
    ) -> None:
        super().__init__()
        # from_pretrained returns eval mode, and Lightning keeps modules in the mode it finds.
        self.model = model.train()
        self.learning_rate = float(learning_rate)
        self.weight_decay = float(weight_decay)
        self.warmup_ratio = float(warmup_ratio)
        self.betas = tuple(betas)
        # Compute accounting, summed over the whole fit (read by the pipeline afterwards).
        self.tokens_trained = 0
        self.padding_tokens_trained = 0

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        return sft_loss(logits, batch["labels"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"SFT loss is {loss.item()} at global step {self.global_step} (batch {batch_idx});"
                " stopping before it corrupts the weights. Lower method.learning_rate or check"
                " the precision setting."
            )
        real = int(batch["attention_mask"].sum())
        self.tokens_trained += real
        self.padding_tokens_trained += batch["attention_mask"].numel() - real
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self._loss(batch)
        self.log(
            "eval/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].size(0)
        )
