"""Direct preference optimisation, from the SFT weights (the study's SFT→DPO).

One concatenated forward pass scores chosen and rejected completions together; the loss is
``losses.dpo_loss``; metrics carry TRL's names so W&B panels line up with TRL runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch

from clintune.methods.losses import DPO_LOSS_TYPES, completion_logps, dpo_loss
from clintune.methods.optim import adamw_warmup_cosine
from clintune.tokenization import IGNORE_INDEX

REFERENCE_MODES = ("precompute", "adapter_disabled", "copy")


def completion_mean_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over completion tokens of the vocabulary-mean logit (TRL's ``logits/…``)."""
    mask = labels[:, 1:] != IGNORE_INDEX
    per_token = logits[:, :-1, :].float().mean(-1)
    return per_token[mask].mean() if mask.any() else per_token.new_zeros(())


def sequence_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row summed completion log-probs, per-row completion lengths) of a batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lengths = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)
    return completion_logps(logits, batch["labels"]), lengths


@contextlib.contextmanager
def adapter_disabled(model: torch.nn.Module) -> Iterator[None]:
    if not hasattr(model, "disable_adapter"):
        raise ValueError(
            "method.reference=adapter_disabled needs a LoRA policy (model.lora.enabled=true)"
        )
    with model.disable_adapter():
        yield


class DPOModule(L.LightningModule):
    """Batches hold chosen rows then rejected rows (``tokenization.collate_pairs``) and, for
    ``reference=precompute``, ``ref_chosen_logps``/``ref_rejected_logps``."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        learning_rate: float,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        reference: str = "precompute",
        reference_model: torch.nn.Module | None = None,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        super().__init__()
        if loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"method.module.loss_type must be one of {DPO_LOSS_TYPES}")
        if reference not in REFERENCE_MODES:
            raise ValueError(
                f"method.reference must be one of {REFERENCE_MODES}, got {reference!r}"
            )
        if reference == "copy" and reference_model is None:
            raise ValueError("method.reference=copy needs the frozen reference model")
        self.model = model.train()
        self.reference = reference
        # Kept out of the module tree so the optimiser, checkpoints and .train() ignore it.
        self._reference_model = (
            [reference_model.eval().requires_grad_(False)] if reference_model else []
        )
        self.beta = float(beta)
        self.loss_type = loss_type
        self.label_smoothing = float(label_smoothing)
        self.learning_rate = float(learning_rate)
        self.weight_decay = float(weight_decay)
        self.warmup_ratio = float(warmup_ratio)
        self.betas = tuple(betas)
        self.tokens_trained = 0
        self.padding_tokens_trained = 0
        self.reference_tokens = 0

    def on_fit_start(self) -> None:
        for reference in self._reference_model:
            reference.to(self.device)

    def _reference_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference == "precompute":
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        if self.training:
            self.reference_tokens += int(batch["attention_mask"].sum())
        with torch.no_grad():
            if self.reference == "copy":
                logps, _ = sequence_logps(self._reference_model[0], batch)
            else:
                with adapter_disabled(self.model):
                    logps, _ = sequence_logps(self.model, batch)
        return logps.chunk(2)

    def pair_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-pair losses and everything TRL logs about them."""
        logits = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        logps = completion_logps(logits, batch["labels"])
        lengths = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)
        chosen_logps, rejected_logps = logps.chunk(2)
        chosen_lengths, rejected_lengths = lengths.chunk(2)
        ref_chosen, ref_rejected = self._reference_logps(batch)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen.to(chosen_logps.dtype),
            ref_rejected.to(rejected_logps.dtype),
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
        )
        half = batch["labels"].size(0) // 2
        return {
            "losses": losses,
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "logps/chosen": chosen_logps.detach(),
            "logps/rejected": rejected_logps.detach(),
            "logits/chosen": completion_mean_logits(logits[:half].detach(), batch["labels"][:half]),
            "logits/rejected": completion_mean_logits(
                logits[half:].detach(), batch["labels"][half:]
            ),
        }

    def _log_pairs(self, prefix: str, out: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        pairs = out["losses"].size(0)
        sync = prefix == "eval"
        chosen, rejected = out["rewards/chosen"], out["rewards/rejected"]
        values = {
            "loss": loss,
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "logps/chosen": out["logps/chosen"].mean(),
            "logps/rejected": out["logps/rejected"].mean(),
            "logits/chosen": out["logits/chosen"],
            "logits/rejected": out["logits/rejected"],
        }
        for name, value in values.items():
            self.log(
                f"{prefix}/{name}",
                value,
                batch_size=pairs,
                sync_dist=sync,
                prog_bar=name in ("loss", "rewards/accuracies"),
            )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.pair_losses(batch)
        loss = out["losses"].mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"DPO loss is {loss.item()} at global step {self.global_step} (batch {batch_idx});"
                " stopping with the last good checkpoint intact. Lower method.module.learning_rate"
                " or beta, or check the precision setting."
            )
        real = int(batch["attention_mask"].sum())
        self.tokens_trained += real
        self.padding_tokens_trained += batch["attention_mask"].numel() - real
        self._log_pairs("train", out, loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.pair_losses(batch)
        self._log_pairs("eval", out, out["losses"].mean())

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_warmup_cosine(
            self.model,
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            warmup_ratio=self.warmup_ratio,
            betas=self.betas,
            total_steps=int(self.trainer.estimated_stepping_batches),
        )


@torch.no_grad()
def precompute_reference_logps(
    model: torch.nn.Module, batches: Iterator[dict[str, torch.Tensor]] | list
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Reference log-probs of every pair, in loader order: (chosen, rejected, tokens)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chosen, rejected, tokens = [], [], 0
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items()}
        logps, _ = sequence_logps(model, batch)
        first, second = logps.chunk(2)
        chosen.append(first.float().cpu())
        rejected.append(second.float().cpu())
        tokens += int(batch["attention_mask"].sum())
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected), tokens
