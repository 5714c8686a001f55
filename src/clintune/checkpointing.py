"""Surviving kills and preemption: atomic training checkpoints, a data order that resumes
mid-epoch exactly, and a save at the next step boundary when SIGTERM (or the scheduler's
preemption signal) arrives.

A stage trains in a work directory keyed by the content hash of everything that decides its
result, so re-running the same command (or a requeued SLURM job) finds the last complete
checkpoint whatever its run directory is called."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DistributedSampler

from clintune import distributed
from clintune.batching import length_grouped_order
from clintune.errors import TrainingInterrupted, preemption_signals
from clintune.io import atomic_open
from clintune.models.loading import save_trained
from clintune.sharding import ShardedStrategy, full_state_dict

LAST_CHECKPOINT = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside it, syncs it, then renames it over the
    old one: a kill mid-write leaves the previous checkpoint, never half of a new one."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        with atomic_open(path) as handle:
            torch.save(checkpoint, handle)


class EpochSampler(DistributedSampler):
    """Shuffles by ``seed + epoch`` the same way whatever the number of processes, and rank r
    takes every W-th index, so one process and W processes see the same global batches.
    With ``lengths``, global batches of ``batch_size`` × W items are grouped by length
    (``batching.length_grouped_order``); the order depends on the global batch, not on W.
    ``skip`` drops this rank's indices already consumed in the epoch (set when resuming)."""

    def __init__(
        self,
        dataset: Any,
        *,
        shuffle: bool,
        seed: int,
        num_replicas: int | None = None,
        rank: int | None = None,
        lengths: Sequence[int] | None = None,
        batch_size: int = 1,
        bucket_batches: int = 1,
    ) -> None:
        super().__init__(
            dataset,
            num_replicas=distributed.world_size() if num_replicas is None else num_replicas,
            rank=distributed.rank() if rank is None else rank,
            shuffle=shuffle,
            seed=seed,
        )
        if lengths is not None and len(lengths) != len(dataset):
            raise ValueError(f"{len(lengths)} lengths for {len(dataset)} items")
        self.lengths = lengths
        self.global_batch = batch_size * self.num_replicas
        self.bucket_batches = bucket_batches
        self.skip = 0

    def _grouped_indices(self) -> list[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        count = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            order = torch.randperm(count, generator=generator).tolist()
        else:
            order = list(range(count))
        assert self.lengths is not None
        order = length_grouped_order(
            order,
            self.lengths,
            global_batch=self.global_batch,
            bucket_batches=self.bucket_batches,
            generator=generator,
        )
        # As DistributedSampler does: repeat from the start so every rank gets as many.
        padding = self.total_size - len(order)
        order += (order * (padding // max(len(order), 1) + 1))[:padding]
        return order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Any:
        indices = list(super().__iter__()) if self.lengths is None else self._grouped_indices()
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


def _rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain numbers, which Lightning's safe
    (weights-only) checkpoint loading accepts."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state(
        ("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian)
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


class TrainingState(Callback):
    """Saves the whole training state (weights, optimiser, scheduler, loop position, data
    order, random generators) to ``path`` every ``every_n_steps`` optimiser steps, and at the
    next step boundary after a preemption signal; then stops with ``TrainingInterrupted``."""

    def __init__(
        self, path: Path, sampler: EpochSampler, *, batch_size: int, every_n_steps: int
    ) -> None:
        self.path = path
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.every_n_steps = int(every_n_steps)
        self._epoch = 0
        self._consumed = 0
        self._batches_per_epoch = 0
        self._last_step = 0
        self._signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._rng_to_restore: dict[str, Any] | None = None
        self.seconds_before = 0.0  # training time spent by earlier, interrupted attempts
        self._started = time.perf_counter()

    @property
    def state_key(self) -> str:
        return "TrainingState"

    # ---- signals: the handler only records; saving happens at a step boundary
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signal = signum

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        self._started = time.perf_counter()
        for signum in preemption_signals():
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)
        if trainer.is_global_zero:
            names = " or ".join(signal.Signals(s).name for s in preemption_signals())
            # Said once the handlers are in place: from here on a signal is safe to send.
            print(
                f"Training: {names} now saves a checkpoint at the next optimiser step and "
                "stops (exit 143); the same command resumes",
                flush=True,
            )

    def teardown(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def _signal_agreed(self, trainer: L.Trainer, module: L.LightningModule) -> int:
        """The signal any rank received (0 if none): all ranks must stop at the same step.
        Lightning's own handler covers the moments before training starts."""
        received = self._signal or (signal.SIGTERM if trainer.received_sigterm else 0)
        local = torch.tensor([received], device=module.device)
        if distributed.is_initialized():
            torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MAX)
        return int(local.item())

    def on_train_batch_start(
        self, trainer: L.Trainer, module: L.LightningModule, batch: Any, idx: int
    ) -> None:
        # Restored here, not at load time: Lightning's set-up between the two draws from the
        # generators, and the first resumed batch must see exactly what the killed run's did.
        if self._rng_to_restore is not None:
            _set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self._epoch = trainer.current_epoch
        self._consumed = idx + 1
        self._batches_per_epoch = int(trainer.num_training_batches)
        stepped = trainer.global_step != self._last_step
        self._last_step = trainer.global_step
        if not stepped:
            return  # mid-accumulation: the gradients so far are not in a checkpoint
        signum = self._signal_agreed(trainer, module)
        if signum:
            trainer.save_checkpoint(self.path, weights_only=False)
            raise TrainingInterrupted(signum, self.path)
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            trainer.save_checkpoint(self.path, weights_only=False)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "consumed": self._consumed,
            "batches_per_epoch": self._batches_per_epoch,
            # Every rank's own: ranks draw different amounts (dropout on batches of different
            # lengths), and only rank zero writes the checkpoint. All ranks save together.
            "rng": distributed.gather_to_all(_rng_state()),
            "seconds": self.seconds_before + time.perf_counter() - self._started,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Lightning restores callbacks before it creates the first data iterator, so the
        # sampler is positioned here.
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if consumed >= int(state["batches_per_epoch"]):
            epoch, consumed = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.sampler.skip = consumed * self.batch_size
        # One state per rank, in rank order; the stage's work directory is keyed by the trainer
        # config, so a checkpoint is only resumed with the number of processes that wrote it.
        self._rng_to_restore = state["rng"][distributed.rank()]
        self.seconds_before = float(state["seconds"])


def requeue_with_submitit() -> bool:
    """Inside a submitit job (the SLURM launcher), hand over to submitit's own preemption
    handler: it pickles the job again and requeues it (the requeued job then resumes from
    the checkpoint just saved). False outside submitit."""
    try:
        from submitit.core.job_environment import SignalHandler
    except ImportError:
        return False
    for signum in preemption_signals()[1:]:
        handler = signal.getsignal(signum)
        if isinstance(getattr(handler, "__self__", None), SignalHandler):
            handler(signum, None)  # type: ignore[operator]
            return True
    return False


class SaveWeights(Callback):
    """Keeps the best or last weights in Hugging Face format: full weights, or only the
    adapter under LoRA. ``best`` is the lowest monitored value (``eval/loss``), ``best_metric``
    the highest (the task's headline metric on the validation split, which
    ``clintune.eval.validation.ValidationMetric`` logs). The previous good save stays until a
    new one is complete, so a crash or a NaN stop leaves the last good weights intact."""

    def __init__(
        self,
        dirpath: Path,
        tokenizer: Any,
        *,
        monitor: str,
        save: str,
        info: dict[str, Any],
        extra_dirs: dict[str, Path] | None = None,
    ) -> None:
        if save not in {"best", "last", "best_metric"}:
            raise ValueError(f"method.save must be 'best', 'last' or 'best_metric', got {save!r}")
        self.dirpath = dirpath
        self.tokenizer = tokenizer
        self.monitor = monitor
        self.save = save
        self.info = info
        self.extra_dirs = extra_dirs or {}
        self.best: float | None = None
        self.saved_step: int | None = None

    def _write(self, trainer: L.Trainer, module: L.LightningModule, value: float | None) -> None:
        state_dict = None
        if isinstance(trainer.strategy, ShardedStrategy):
            # Sharded parameters: every rank takes part in gathering the full weights.
            state_dict = full_state_dict(module.model)
        if trainer.is_global_zero:
            info = {**self.info, "step": trainer.global_step, self.monitor: value}
            save_trained(
                module.model, self.tokenizer, self.dirpath, info, self.extra_dirs, state_dict
            )
        self.saved_step = trainer.global_step

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.save == "last":
            return
        metric = trainer.callback_metrics.get(self.monitor)
        if metric is None or not torch.isfinite(metric):
            return
        value = float(metric)
        if self.best is None or self.improves(value, self.best):
            self.best = value
            self._write(trainer, module, value)

    def improves(self, value: float, best: float) -> bool:
        # A loss is best lowest, a task metric highest; a tie keeps the earlier weights.
        return value > best if self.save == "best_metric" else value < best

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.save == "last" or self.saved_step is None:
            self._write(trainer, module, None)

    @property
    def best_or_nan(self) -> float:
        """The best monitored value seen (NaN before any validation)."""
        return float(self.best) if self.best is not None else float("nan")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "saved_step": self.saved_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.saved_step = state["best"], state["saved_step"]
