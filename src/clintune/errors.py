"""Errors that are the user's to fix (config, data, hardware): the entry points print them as
one clear message instead of a stack trace."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


class UserError(Exception):
    """Something about the user's config, data or machine, explained in its message."""


def print_user_error(error: UserError) -> None:
    """One ``error:`` line per problem, on stderr."""
    for line in str(error).splitlines() or [type(error).__name__]:
        print(f"error: {line}", file=sys.stderr)


def require_accelerator(accelerator: str) -> None:
    """Fail early and plainly when the config asks for a GPU that is not there."""
    import torch

    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        built_with = torch.version.cuda or "no CUDA (a CPU-only build)"
        raise UserError(
            f"trainer.accelerator={accelerator} asks for a GPU, but PyTorch sees none "
            f"(torch {torch.__version__}, built with {built_with}). Use trainer=cpu, or check "
            "the driver, CUDA_VISIBLE_DEVICES and that a CUDA build of torch is installed."
        )


def out_of_memory_message(stage: str, batch_size: int) -> str:
    return (
        f"CUDA ran out of memory during the {stage} stage (batch size {batch_size}). Try, "
        "alone or together: model.lora.enabled=true (train an adapter, not all weights); a "
        f"smaller method.train.batch_size with method.train.accumulate_grad_batches to keep "
        "the global batch; trainer.precision=bf16-true; a shorter model.max_length; or more "
        "GPUs."
    )


# Exit status of a run stopped by a signal after saving its checkpoint (128 + SIGTERM).
INTERRUPTED_EXIT_CODE = 143


class TrainingInterrupted(Exception):
    """Training stopped on a signal after its state was saved; rerunning resumes it."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after saving {checkpoint}; "
            "run the same command again to resume"
        )
        self.signum = signum
        self.checkpoint = checkpoint


def preemption_signals() -> list[int]:
    # SIGTERM from `scancel`, Kubernetes or SLURM's preemption; submitit's own signal (USR2
    # unless SUBMITIT_PREEMPT_SIGNAL says otherwise) arrives ahead of a time limit.
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    extra = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
    return [signal.SIGTERM] + ([extra] if extra is not None else [])
