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


# --------------------------------------------------------------------------- beside DPO
#
# The same conventions as ``dpo_loss``: inputs are per-example sums of completion-token
# log-probs (plus completion lengths where a method normalises by them); outputs are
# per-example losses and detached rewards, as TRL logs them.


def _per_token(logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Summed log-probs divided by completion length: TRL's ``average_log_prob``."""
    return logps / lengths.to(logps.dtype).clamp(min=1)


def chosen_nll(
    chosen_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    num_tokens: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Per-example shares of the chosen completions' negative log-likelihood.

    By default each example's own mean per token. With ``num_tokens`` (the batch's chosen
    completion tokens) each share is −log π(y_w|x)·B/num_tokens, so that the shares' mean is
    the token-weighted mean over the batch, which is what TRL's ORPO and ``"sft"`` DPO terms
    compute. As for ``sft_loss``, data-parallel ranks pass the global count divided by the
    world size."""
    if num_tokens is None:
        return -_per_token(chosen_logps, chosen_lengths)
    return -chosen_logps * chosen_logps.size(0) / num_tokens


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, switching formula at −ln 2 to avoid cancellation."""
    return torch.where(
        x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x))
    )


def orpo_log_odds(
    chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor
) -> torch.Tensor:
    """log(odds(y_w) / odds(y_l)) with odds(y) = P(y)/(1 − P(y)) and P the per-token mean
    probability exp(mean log-prob), as ORPO (Hong et al. 2024, eqs. 4 and 7) defines it."""
    return (chosen_mean_logps - rejected_mean_logps) - (
        log1mexp(chosen_mean_logps) - log1mexp(rejected_mean_logps)
    )


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 0.1,
    nll_num_tokens: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO: NLL of the chosen completion − β·log σ(log odds ratio), no reference model.

    Log-probs are normalised by completion length (TRL's ``average_log_prob=True``); β is the
    paper's λ. Rewards are β·(mean log-prob), as TRL's ``ORPOTrainer`` logs them. The NLL
    term covers the chosen completion's tokens (the tokens SFT trains on); TRL 1.16 computes it
    over prompt and completion, which agrees when the prompt is one token long.
    ``nll_num_tokens`` as in ``chosen_nll``."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    chosen = _per_token(policy_chosen_logps, chosen_lengths)
    rejected = _per_token(policy_rejected_logps, rejected_lengths)
    ratio = F.logsigmoid(orpo_log_odds(chosen, rejected))
    nll = chosen_nll(policy_chosen_logps, chosen_lengths, nll_num_tokens)
    losses = nll - beta * ratio
    return losses, beta * chosen.detach(), beta * rejected.detach()


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024): −log σ(β·(Δ̄ − γ/β)), no reference model, where Δ̄ is the
    difference of the length-normalised log-probs and γ the target reward margin; with
    ``label_smoothing`` ε the conservative form −(1−ε)·log σ(z) − ε·log σ(−z), as TRL's
    ``CPOTrainer(loss_type="simpo")``. Rewards are β·(mean log-prob)."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    chosen = _per_token(policy_chosen_logps, chosen_lengths)
    rejected = _per_token(policy_rejected_logps, rejected_lengths)
    z = beta * ((chosen - rejected) - gamma / beta)
    losses = -(1 - label_smoothing) * F.logsigmoid(z)
    if label_smoothing:
        losses = losses - label_smoothing * F.logsigmoid(-z)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def kto_kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z₀: the batch mean of log π − log π_ref over mismatched
    (prompt, completion) pairs, detached. Average it over data-parallel ranks before
    ``kto_loss`` (which clamps it at 0), as TRL gathers it."""
    return (policy_kl_logps - ref_kl_logps).mean().detach()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 7) on unpaired examples, as TRL's ``KTOTrainer``.

    With r = log π − log π_ref and z₀ = max(kl, 0): a desirable example's loss is
    λ_D·(1 − σ(β(r − z₀))), an undesirable one's λ_U·(1 − σ(β(z₀ − r))). ``losses`` follow the
    input order; ``chosen_rewards`` are β·r of the desirable examples and
    ``rejected_rewards`` those of the undesirable ones (so they differ in length from the
    batch, as in TRL)."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError("desirable_weight and undesirable_weight must not be negative")
    desirable = desirable.bool()
    z0 = kl.detach().clamp(min=0)
    logratios = policy_logps - ref_logps
    wanted = desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0)))
    unwanted = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios)))
    losses = torch.where(desirable, wanted, unwanted)
    rewards = beta * logratios.detach()
    return losses, rewards[desirable], rewards[~desirable]


def rpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor | None = None,
    beta: float = 0.1,
    nll_alpha: float = 1.0,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    nll_num_tokens: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RPO (Pang et al. 2024): ``dpo_loss`` + α·NLL of the chosen completion, which keeps the
    chosen answer's likelihood from falling; TRL's ``DPOTrainer`` with
    ``loss_type=["sigmoid", "sft"]`` and ``loss_weights=[1, α]``. Rewards are DPO's.
    ``nll_num_tokens`` as in ``chosen_nll``."""
    if nll_alpha < 0:
        raise ValueError(f"nll_alpha must not be negative, got {nll_alpha}")
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        chosen_lengths=chosen_lengths if rejected_lengths is not None else None,
        rejected_lengths=rejected_lengths,
    )
    nll = chosen_nll(policy_chosen_logps, chosen_lengths, nll_num_tokens)
    return losses + nll_alpha * nll, chosen_rewards, rejected_rewards
