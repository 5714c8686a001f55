"""SimPO: reference-free, length-normalised log-probs with a target margin
(``losses.simpo_loss``); TRL's ``CPOTrainer(loss_type="simpo")`` metric names."""

from __future__ import annotations

from typing import Any

import torch

from clintune.methods.dpo import PairForward, PreferenceModule
from clintune.methods.losses import simpo_loss


class SimPOModule(PreferenceModule):
    METHOD = "SimPO"

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        learning_rate: float,
        beta: float = 2.0,
        gamma: float = 1.0,
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, learning_rate=learning_rate, reference=None, **kwargs)
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)

    def losses_and_metrics(
        self, out: PairForward, batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        chosen_logps, rejected_logps = out.logps.chunk(2)
        chosen_lengths, rejected_lengths = out.lengths.chunk(2)
        losses, chosen_rewards, rejected_rewards = simpo_loss(
            chosen_logps,
            rejected_logps,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            beta=self.beta,
            gamma=self.gamma,
            label_smoothing=self.label_smoothing,
        )
        return {
            "losses": losses,
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            # TRL logs SimPO's log-probs per token (its average_log_prob=True).
            "logps/chosen": (chosen_logps / chosen_lengths.clamp(min=1)).detach(),
            "logps/rejected": (rejected_logps / rejected_lengths.clamp(min=1)).detach(),
        }
