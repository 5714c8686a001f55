"""Loss math as pure functions on tensors; the LightningModules only call these."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clintune.tokenization import IGNORE_INDEX


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    # Softmax in half precision loses the small probabilities that log-likelihoods sum over.
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def shift_for_next_token(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Align position t's logits with token t+1."""
    return logits[:, :-1, :], labels[:, 1:]


def completion_token_count(labels: torch.Tensor) -> torch.Tensor:
    """How many tokens ``sft_loss`` averages over (the shifted labels that are not ignored)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target token) at every position, in at least float32: the one log-prob helper
    behind the SFT loss, both DPO forward layouts and the reference pass. ``logits[:, t]``
    must already be the distribution that predicts ``targets[:, t]``; ignored positions must
    hold a valid token id (callers mask them out afterwards)."""
    return torch.gather(
        _at_least_float32(logits).log_softmax(-1), 2, targets.unsqueeze(-1)
    ).squeeze(-1)


def _shifted_completion(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log-probs of the next token and the mask of completion positions."""
    shifted_logits, shifted_labels = shift_for_next_token(logits, labels)
    mask = shifted_labels != IGNORE_INDEX
    return token_logps(shifted_logits, shifted_labels.masked_fill(~mask, 0)), mask


def sft_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_tokens: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token cross-entropy summed over the completion tokens (labels != IGNORE_INDEX),
    divided by ``num_tokens`` (default: this batch's count, i.e. the mean). Passing the count
    over all data-parallel ranks makes every rank's share add up to the global batch's mean."""
    logps, mask = _shifted_completion(logits, labels)
    if not mask.any():
        raise ValueError("the batch has no completion tokens to train on")
    if num_tokens is None:
        num_tokens = completion_token_count(labels)
    return -(logps * mask).sum() / num_tokens


def completion_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example sum of the log-probabilities of the completion tokens."""
    logps, mask = _shifted_completion(logits, labels)
    return (logps * mask).sum(-1)


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example DPO losses and rewards, with TRL's conventions.

    Inputs are per-example sums of completion-token log-probs. Rewards are
    β·(log π − log π_ref), detached, as TRL logs them. With Δ the difference of the chosen and
    rejected log-ratios:

    - ``sigmoid``: −log σ(βΔ). ``label_smoothing`` ε > 0 makes it conservative DPO (cDPO):
      −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ). TRL 1.16 ignores label smoothing for sigmoid; at
      ε = 0 the two agree exactly.
    - ``ipo``: (Δ̄ − 1/(2β))², where Δ̄ uses log-ratios divided by completion lengths when
      ``chosen_lengths``/``rejected_lengths`` are given (TRL's normalisation, which the IPO
      authors confirmed), else the raw sums of the IPO paper.
    - ``hinge``: max(0, 1 − βΔ) (SLiC).
    - ``robust``: the unbiased noisy-label estimator of Chowdhury et al.,
      [−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)] / (1 − 2ε), with ε in [0, 0.5).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("give both chosen_lengths and rejected_lengths, or neither")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        if label_smoothing:
            losses = losses - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_lengths is not None and rejected_lengths is not None:
            delta = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / (
                rejected_lengths.clamp(min=1)
            )
        losses = (delta - 1 / (2 * beta)) ** 2
    else:  # robust
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * label_smoothing)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards
