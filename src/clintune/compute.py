"""Compute accounting: wall time, tokens, an estimate of FLOPs and peak memory."""

from __future__ import annotations

import math
import resource
import sys
import time
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from clintune import distributed
from clintune.models.loading import count_parameters


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


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class StepThroughput(Callback):
    """Training tokens per second (summed over ranks) over the optimiser steps after the
    first, which pays for allocation, kernel selection and FSDP's lazy set-up: the steady
    rate, which a short run's ``train_seconds`` (set-up and validation included) understates.
    NaN when fewer than two steps ran in this attempt."""

    def __init__(self) -> None:
        self._started: float | None = None
        self._tokens_before = 0
        self.tokens_per_second = math.nan

    def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
        if self._started is None and trainer.global_step >= 1:
            _synchronize()
            self._started = time.perf_counter()
            self._tokens_before = int(module.tokens_trained)

    def on_train_end(self, trainer: Any, module: Any) -> None:
        _synchronize()
        started = self._started
        elapsed = time.perf_counter() - started if started is not None else 0.0
        tokens = int(module.tokens_trained) - self._tokens_before if started is not None else 0
        # Every rank takes part, measured or not: the gathers are collective.
        elapsed = max(distributed.gather_to_all(elapsed))
        tokens = sum(distributed.gather_to_all(tokens))
        self.tokens_per_second = tokens / elapsed if elapsed > 0 and tokens > 0 else math.nan


def stage_compute(
    stage: str,
    seconds: float,
    module: Any,
    model: torch.nn.Module,
    steps: int,
    reference_tokens: int = 0,
    tokens_per_second: float = math.nan,
) -> dict[str, float]:
    """A stage's ``compute/<stage>/…`` figures, summed (tokens) or maxed (memory) over ranks."""
    total, trainable = count_parameters(model)
    # One GPU per process where the stage trained on CUDA; GPU-hours are what a GPU bill
    # counts: the stage's wall time times the GPUs it held.
    on_gpu = any(parameter.is_cuda for parameter in model.parameters())
    gpus = float(distributed.world_size()) if on_gpu else 0.0
    # Every rank counts its own share of the data.
    tokens = sum(distributed.gather_to_all(int(module.tokens_trained)))
    padding = sum(distributed.gather_to_all(int(module.padding_tokens_trained)))
    peak = max(distributed.gather_to_all(peak_memory_bytes()))
    return {
        f"compute/{stage}/train_seconds": seconds,
        f"compute/{stage}/tokens": float(tokens),
        f"compute/{stage}/padding_tokens": float(padding),
        f"compute/{stage}/reference_tokens": float(reference_tokens),
        f"compute/{stage}/flops_estimate": training_flops(total, trainable, tokens)
        + forward_flops(total, reference_tokens),
        f"compute/{stage}/optimizer_steps": float(steps),
        f"compute/{stage}/parameters": float(total),
        f"compute/{stage}/trainable_parameters": float(trainable),
        f"compute/{stage}/peak_memory_bytes": float(peak),
        f"compute/{stage}/processes": float(distributed.world_size()),
        f"compute/{stage}/tokens_per_second": float(tokens_per_second),
        f"compute/{stage}/gpus": gpus,
        f"compute/{stage}/gpu_hours": seconds * gpus / 3600,
    }


def total_compute(metrics: dict[str, float], stages: list[str]) -> dict[str, float]:
    """Totals over the stages a method ran (a reused stage counts: its cost was paid)."""
    totals: dict[str, float] = {}
    for figure in (
        "train_seconds",
        "tokens",
        "padding_tokens",
        "reference_tokens",
        "flops_estimate",
        "gpu_hours",
    ):
        totals[f"compute/{figure}"] = sum(metrics.get(f"compute/{s}/{figure}", 0.0) for s in stages)
    peaks = [metrics.get(f"compute/{s}/peak_memory_bytes", 0.0) for s in stages]
    totals["compute/stage_peak_memory_bytes"] = max(peaks) if peaks else 0.0
    if stages:
        last = stages[-1]
        totals["compute/parameters"] = metrics.get(f"compute/{last}/parameters", 0.0)
        totals["compute/trainable_parameters"] = metrics.get(
            f"compute/{last}/trainable_parameters", 0.0
        )
    return totals
