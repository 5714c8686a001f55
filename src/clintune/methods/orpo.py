"""ORPO: one stage from the base model, the chosen answer's NLL plus an odds-ratio term,
no reference model (``losses.orpo_loss``); TRL's ``ORPOTrainer`` metric names."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from clintune.methods.dpo import PairForward, PreferenceModule
from clintune.methods.losses import orpo_log_odds, orpo_loss


class ORPOModule(PreferenceModule):
    METHOD = "ORPO"
    EXTRA_METRICS = ("nll_loss", "log_odds_ratio", "log_odds_chosen")

    def __init__(
        self, model: torch.nn.Module, *, learning_rate: float, beta: float = 0.1, **kwargs: Any
    ) -> None:
        super().__init__(model, learning_rate=learning_rate, reference=None, **kwargs)
        self.beta = float(beta)

    def losses_and_metrics(
        self, out: PairForward, batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        chosen_logps, rejected_logps = out.logps.chunk(2)
        chosen_lengths, rejected_lengths = out.lengths.chunk(2)
        nll_tokens = self.nll_num_tokens(chosen_lengths)
        losses, chosen_rewards, rejected_rewards = orpo_loss(
            chosen_logps,
            rejected_logps,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            beta=self.beta,
            nll_num_tokens=nll_tokens,
        )
        # TRL logs ORPO's log-probs per token (its average_log_prob=True).
        chosen_mean = (chosen_logps / chosen_lengths.clamp(min=1)).detach()
        rejected_mean = (rejected_logps / rejected_lengths.clamp(min=1)).detach()
        log_odds = orpo_log_odds(chosen_mean, rejected_mean)
        return {
            "losses": losses,
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "logps/chosen": chosen_mean,
            "logps/rejected": rejected_mean,
            "nll_loss": -chosen_logps.detach().sum() / nll_tokens,
            "log_odds_ratio": F.logsigmoid(log_odds).mean(),
            "log_odds_chosen": log_odds.mean(),
        }
