"""Compute accounting: wall time, tokens, an estimate of FLOPs and peak memory."""

from __future__ import annotations

import resource
import sys

import torch


def training_flops(total_params: int, trainable_params: int, tokens: int) -> float:
    """FLOPs of forward + backward over ``tokens``.

    Forward is 2·N per token, back-propagating activations another 2·N through every weight
    (frozen or not), and weight gradients 2·N_trainable. Full fine-tuning gives the familiar
    6·N·tokens; under LoRA N is the whole model and N_trainable the adapter.
    """
    return float((4 * total_params + 2 * trainable_params) * tokens)


def forward_flops(total_params: int, tokens: int) -> float:
    """FLOPs of a forward pass only (reference models, generation): 2·N·tokens."""
    return float(2 * total_params * tokens)


def peak_memory_bytes() -> int:
    """Peak accelerator memory allocated on CUDA, else the process's peak resident set."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
