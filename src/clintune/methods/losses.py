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


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the completion tokens (labels != IGNORE_INDEX)."""
    shifted_logits, shifted_labels = shift_for_next_token(logits, labels)
    if not (shifted_labels != IGNORE_INDEX).any():
        raise ValueError("the batch has no completion tokens to train on")
    return F.cross_entropy(
        _at_least_float32(shifted_logits.reshape(-1, shifted_logits.size(-1))),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def completion_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example sum of the log-probabilities of the completion tokens."""
    shifted_logits, shifted_labels = shift_for_next_token(logits, labels)
    mask = shifted_labels != IGNORE_INDEX
    safe_labels = shifted_labels.masked_fill(~mask, 0)
    token_logps = torch.gather(
        _at_least_float32(shifted_logits).log_softmax(-1), 2, safe_labels.unsqueeze(-1)
    ).squeeze(-1)
    return (token_logps * mask).sum(-1)
