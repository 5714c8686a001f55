"""KTO on unpaired examples (``losses.kto_loss``), with TRL's ``KTOTrainer`` metric names.

A batch is laid out as DPO's pairs: the "chosen" row of item i is example i's own completion,
the "rejected" row a completion written for another prompt (KTO's mismatched pair, whose
log-ratio to the reference estimates the KL reference point); ``desirable`` says which
examples are thumbs-up. So the forward pass, both reference modes and the reference
precompute are DPO's, and the prompt runs once for both rows."""

from __future__ import annotations

from typing import Any

import torch

from clintune.methods.dpo import PairForward, PreferenceModule
from clintune.methods.losses import kto_kl_estimate, kto_loss


class KTOModule(PreferenceModule):
    METHOD = "KTO"
    # The desirable/undesirable means are over counts that differ per rank: reduced by hand.
    SYNC_LOGGED = False

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        learning_rate: float,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        reference: str = "precompute",
        **kwargs: Any,
    ) -> None:
        super().__init__(model, learning_rate=learning_rate, reference=reference, **kwargs)
        self.beta = float(beta)
        self.desirable_weight = float(desirable_weight)
        self.undesirable_weight = float(undesirable_weight)

    def losses_and_metrics(
        self, out: PairForward, batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        logps, mismatched_logps = out.logps.chunk(2)
        ref_logps, ref_mismatched = self._reference_logps(batch)
        desirable = batch["desirable"].to(logps.device).bool()
        # TRL computes the mismatched pass without gradients; here it is detached.
        kl = kto_kl_estimate(mismatched_logps.detach(), ref_mismatched.to(logps.dtype))
        world = self._world_size()
        if world > 1:  # TRL gathers the per-rank estimates and averages them
            kl = self._sum_over_ranks(kl) / world
        losses, chosen_rewards, rejected_rewards = kto_loss(
            logps,
            ref_logps.to(logps.dtype),
            desirable,
            kl,
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
        )
        own_lengths, _ = out.lengths.chunk(2)
        own_logit_sums, _ = out.logit_sums.chunk(2)
        detached = logps.detach()
        return {
            "losses": losses,
            "kl": kl.clamp(min=0),
            "desirable": desirable,
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "logps/chosen": detached[desirable],
            "logps/rejected": detached[~desirable],
            "logit_sums/chosen": own_logit_sums[desirable].sum(),
            "logit_sums/rejected": own_logit_sums[~desirable].sum(),
            "lengths/chosen": own_lengths[desirable].sum(),
            "lengths/rejected": own_lengths[~desirable].sum(),
        }

    def logged_values(self, out: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, int]]:
        """TRL's KTO set: means over the desirable ("chosen") and undesirable ("rejected")
        examples of the global batch; a side with no example in the batch is not logged."""
        desirable = out["desirable"]
        sums = torch.stack(
            [
                out["rewards/chosen"].sum(),
                out["rewards/rejected"].sum(),
                out["logps/chosen"].sum(),
                out["logps/rejected"].sum(),
                out["logit_sums/chosen"],
                out["logit_sums/rejected"],
                desirable.sum(),
                (~desirable).sum(),
                out["lengths/chosen"],
                out["lengths/rejected"],
            ]
            # float64: the counts stay exact when summed over ranks
        ).to(torch.float64)
        (r_c, r_r, l_c, l_r, g_c, g_r, n_c, n_r, t_c, t_r) = self._sum_over_ranks(sums)
        values = {"kl": (out["kl"], int(desirable.numel()))}
        if n_c > 0:
            values["rewards/chosen"] = (r_c / n_c, int(n_c))
            values["logps/chosen"] = (l_c / n_c, int(n_c))
            values["logits/chosen"] = (g_c / t_c.clamp(min=1), int(n_c))
        if n_r > 0:
            values["rewards/rejected"] = (r_r / n_r, int(n_r))
            values["logps/rejected"] = (l_r / n_r, int(n_r))
            values["logits/rejected"] = (g_r / t_r.clamp(min=1), int(n_r))
        if n_c > 0 and n_r > 0:
            values["rewards/margins"] = (r_c / n_c - r_r / n_r, int(desirable.numel()))
        return values
