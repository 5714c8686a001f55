"""What every training stage shares: its context, the content-addressed work directory and
its lock, resume from the last complete checkpoint, the Lightning fit, and the hand-over of
the finished weights to the stage's output directory."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from filelock import FileLock, Timeout
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from clintune import distributed, rundir
from clintune.batching import padded_length
from clintune.checkpointing import (
    LAST_CHECKPOINT,
    AtomicCheckpointIO,
    EpochSampler,
    SaveWeights,
    TrainingState,
)
from clintune.compute import StepThroughput
from clintune.errors import UserError, out_of_memory_message
from clintune.eval.validation import ValidationMetric, monitor_for
from clintune.io import link_or_copy
from clintune.settings import Settings, TrainSettings
from clintune.tasks.base import Task
from clintune.tokenization import EncodedExample, encode_example


@dataclass
class StageContext:
    """One run's inputs to its stages: the composed config (for what is instantiated: model,
    trainer), its typed settings (for what clintune reads), the task and its loaded splits."""

    cfg: DictConfig
    settings: Settings
    task: Task
    splits: dict[str, list[dict[str, Any]]]
    run_dir: Path
    wandb_run: Any | None

    @property
    def cache_dir(self) -> Path:
        return Path(str(self.cfg.paths.cache_dir))

    def work_dir(self, name: str) -> Path:
        """Where a stage trains (checkpoints, best weights so far) until it finishes."""
        return self.cache_dir / "training" / name


@dataclass
class StageResult:
    weights: Path
    metrics: dict[str, float]
    key: str  # identifies the weights for downstream caches (reference log-probs)


def container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def task_payload(cfg: DictConfig) -> dict[str, Any]:
    """The task config as it decides training (the judge only grades test outputs)."""
    return {k: v for k, v in (container(cfg.task) or {}).items() if k != "judge"}


def encode_split(
    task: Task, tokenizer: Any, examples: list[dict[str, Any]], max_length: int
) -> tuple[list[EncodedExample], int]:
    encoded = [
        encode_example(tokenizer, task.messages(e), task.target_text(e), max_length)
        for e in examples
    ]
    return encoded, sum(e.truncated for e in encoded)


@contextlib.contextmanager
def stage_lock(work_dir: Path) -> Iterator[None]:
    """One job at a time trains a given stage (rank zero holds the lock for its ranks): a
    second identical job waits, then finds the first one's result."""
    if not distributed.is_rank_zero():
        yield
        return
    work_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(work_dir.with_name(work_dir.name + ".lock")))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"Waiting for another job training the same stage ({work_dir.name}) to finish")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _resume_checkpoint(ctx: StageContext, work_dir: Path) -> Path | None:
    """The last complete checkpoint of this stage, unless ``stages.resume=false`` (which
    discards it and starts over)."""
    checkpoint = work_dir / LAST_CHECKPOINT
    assert ctx.settings.stages is not None
    if distributed.is_rank_zero() and not ctx.settings.stages.resume:
        shutil.rmtree(work_dir, ignore_errors=True)
    # A file, or under FSDP a link to a directory of shards (a dangling link does not exist).
    found = distributed.broadcast_from_rank_zero(checkpoint.exists())
    return checkpoint if found else None


def _loggers(ctx: StageContext, stage_prefix: str) -> list[Any]:
    name = f"{rundir.LOGS}/{stage_prefix}" if stage_prefix else rundir.LOGS
    loggers: list[Any] = [CSVLogger(save_dir=str(ctx.run_dir), name=name, version="")]
    if ctx.wandb_run is not None:
        loggers.append(WandbLogger(experiment=ctx.wandb_run, log_model=False, prefix=stage_prefix))
    return loggers


@dataclass
class FitResult:
    trainer: L.Trainer
    seconds: float  # training time of the whole stage, over resumed attempts too
    resumed: bool
    tokens_per_second: float  # steady state, this attempt (compute.StepThroughput)


def fit(
    ctx: StageContext,
    stage: str,
    train: TrainSettings,
    module: L.LightningModule,
    datasets: tuple[list[Any], list[Any]],
    collate: Any,
    saver: SaveWeights,
    work_dir: Path,
    stage_prefix: str,
    extra_callbacks: Sequence[Callback] = (),
) -> FitResult:
    """``module`` trained on ``datasets`` by the configured Lightning trainer, resuming from
    the work directory's last checkpoint when there is one. ``extra_callbacks`` run before
    ``saver`` (``ValidationMetric`` logs what it monitors)."""
    train_set, val_set = datasets
    seed = ctx.settings.seed
    train_sampler = EpochSampler(
        train_set,
        shuffle=True,
        seed=seed,
        lengths=[padded_length(item) for item in train_set] if train.group_by_length else None,
        batch_size=train.batch_size,
        bucket_batches=train.length_bucket_batches,
    )
    # Own generators, so that loaders never draw from the global one that dropout uses.
    train_loader = DataLoader(
        train_set,
        batch_size=train.batch_size,
        sampler=train_sampler,
        collate_fn=collate,
        generator=torch.Generator(),
    )
    val_loader = DataLoader(
        val_set,
        batch_size=train.eval_batch_size,
        sampler=EpochSampler(val_set, shuffle=False, seed=seed),
        collate_fn=collate,
        generator=torch.Generator(),
    )
    assert ctx.settings.checkpoint is not None
    state = TrainingState(
        work_dir / LAST_CHECKPOINT,
        train_sampler,
        batch_size=train.batch_size,
        every_n_steps=ctx.settings.checkpoint.every_n_steps,
    )
    throughput = StepThroughput()
    trainer: L.Trainer = instantiate(
        ctx.cfg.trainer,
        default_root_dir=str(ctx.run_dir),
        logger=_loggers(ctx, stage_prefix),
        callbacks=[
            *extra_callbacks,
            saver,
            state,
            throughput,
            LearningRateMonitor(logging_interval="step"),
        ],
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,
        max_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        accumulate_grad_batches=train.accumulate_grad_batches,
        gradient_clip_val=train.gradient_clip_val,
        val_check_interval=train.val_check_interval,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    resume_from = _resume_checkpoint(ctx, work_dir)
    if resume_from is not None and distributed.is_rank_zero():
        print(f"Resuming {stage_prefix or stage} from {resume_from}")
    started = time.perf_counter()
    try:
        trainer.fit(
            module,
            train_dataloaders=train_loader,
            val_dataloaders=val_loader,
            ckpt_path=str(resume_from) if resume_from is not None else None,
        )
    except torch.cuda.OutOfMemoryError as error:
        raise UserError(out_of_memory_message(stage, train.batch_size)) from error
    seconds = state.seconds_before + time.perf_counter() - started
    return FitResult(trainer, seconds, resume_from is not None, throughput.tokens_per_second)


def saver_and_callbacks(
    ctx: StageContext,
    save: str,
    train: TrainSettings,
    tokenizer: Any,
    work_dir: Path,
    info: dict[str, Any],
    extra_dirs: dict[str, Path] | None = None,
) -> tuple[SaveWeights, list[Callback]]:
    """The weights saver of a stage, watching ``eval/loss`` or (``save=best_metric``) the
    task's headline metric on the validation split, which the returned callback logs."""
    monitor = monitor_for(save, ctx.task)
    saver = SaveWeights(
        work_dir / "model", tokenizer, monitor=monitor, save=save, info=info, extra_dirs=extra_dirs
    )
    if save != "best_metric":
        return saver, []
    validation = ValidationMetric(
        ctx.task,
        ctx.splits["val"],
        tokenizer,
        max_prompt_length=int(ctx.cfg.model.max_length) - ctx.task.max_new_tokens,
        batch_size=train.eval_batch_size,
    )
    return saver, [validation]


def best_key(stage: str, saver: SaveWeights) -> str:
    """``train/<stage>/best_eval_loss`` or ``train/<stage>/best_eval_<headline metric>``."""
    return f"train/{stage}/best_{saver.monitor.replace('/', '_')}"


def hand_over(source: Path, out_dir: Path, *, drop: Path | None = None) -> None:
    """Rank zero puts the weights in ``source`` at ``out_dir`` (hard links where possible) and
    removes ``drop`` (a finished work directory); every rank waits, so that none reads the
    weights before they are there."""
    if distributed.is_rank_zero():
        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.copytree(source, out_dir, copy_function=link_or_copy)
        if drop is not None:
            shutil.rmtree(drop, ignore_errors=True)
    distributed.barrier()
