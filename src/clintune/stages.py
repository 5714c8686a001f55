"""Training stages (SFT, DPO), the content-addressed stage cache, and compute accounting.

``method=sft`` is one SFT stage. ``method=dpo`` is an SFT stage (reused from the cache when an
identical one already finished) followed by a DPO stage from its weights. A stage's result is
a weights directory in Hugging Face format plus its metrics."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from filelock import FileLock, Timeout
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from clintune import distributed
from clintune.checkpointing import (
    LAST_CHECKPOINT,
    AtomicCheckpointIO,
    EpochSampler,
    TrainingState,
)
from clintune.compute import forward_flops, peak_memory_bytes, training_flops
from clintune.errors import UserError, out_of_memory_message
from clintune.eval.generation import generate_sampled
from clintune.io import atomic_open, write_json_atomic
from clintune.methods.dpo import precompute_reference_logps
from clintune.methods.preferences import build_pairs
from clintune.models.loading import (
    CHECKPOINT_MANIFEST,
    count_parameters,
    load_for_training,
    save_trained,
    uses_gradient_checkpointing,
)
from clintune.tasks.base import Task
from clintune.tokenization import (
    EncodedExample,
    EncodedPair,
    collate_pairs,
    collate_pairs_shared_prompt,
    collate_sft,
    encode_example,
    encode_pair,
    encode_prompt,
)

log = logging.getLogger(__name__)

STAGE_COMPLETE = "stage.json"


@dataclass
class StageResult:
    weights: Path
    metrics: dict[str, float]
    key: str  # identifies the weights for downstream caches (reference log-probs)


def fingerprint(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


class SaveWeights(Callback):
    """Keeps the best (lowest monitored value) or last weights in Hugging Face format: full
    weights, or only the adapter under LoRA. The previous good save stays until a new one is
    complete, so a crash or a NaN stop leaves the last good weights intact."""

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
        if save not in {"best", "last"}:
            raise ValueError(f"method.save must be 'best' or 'last', got {save!r}")
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
        if isinstance(trainer.strategy, FSDPStrategy):
            # Sharded parameters: every rank takes part in gathering the full weights.
            full = trainer.strategy.lightning_module_state_dict()
            state_dict = {k.removeprefix("model."): v for k, v in full.items()}
        if trainer.is_global_zero:
            info = {**self.info, "step": trainer.global_step, self.monitor: value}
            save_trained(
                module.model, self.tokenizer, self.dirpath, info, self.extra_dirs, state_dict
            )
        self.saved_step = trainer.global_step

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.save != "best":
            return
        metric = trainer.callback_metrics.get(self.monitor)
        if metric is None or not torch.isfinite(metric):
            return
        value = float(metric)
        if self.best is None or value < self.best:
            self.best = value
            self._write(trainer, module, value)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.save == "last" or self.saved_step is None:
            self._write(trainer, module, None)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "saved_step": self.saved_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.saved_step = state["best"], state["saved_step"]


def _loggers(run_dir: Path, wandb_run: Any | None, stage_prefix: str) -> list[Any]:
    name = f"logs/{stage_prefix}" if stage_prefix else "logs"
    loggers: list[Any] = [CSVLogger(save_dir=str(run_dir), name=name, version="")]
    if wandb_run is not None:
        loggers.append(WandbLogger(experiment=wandb_run, log_model=False, prefix=stage_prefix))
    return loggers


@dataclass
class FitResult:
    trainer: L.Trainer
    seconds: float  # training time of the whole stage, over resumed attempts too
    resumed: bool


@contextlib.contextmanager
def _stage_lock(work_dir: Path) -> Iterator[None]:
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


def _sft_cache_entry(cfg: DictConfig, key: str) -> Path:
    """Where a finished SFT stage is published for reuse."""
    return Path(cfg.paths.cache_dir) / "stages" / f"sft-{key}"


def _work_dir(cfg: DictConfig, name: str) -> Path:
    """Where a stage trains (checkpoints, best weights so far) until it finishes."""
    return Path(cfg.paths.cache_dir) / "training" / name


def _resume_checkpoint(cfg: DictConfig, work_dir: Path) -> Path | None:
    """The last complete checkpoint of this stage, unless ``stages.resume=false`` (which
    discards it and starts over)."""
    checkpoint = work_dir / LAST_CHECKPOINT
    if distributed.is_rank_zero() and not bool(cfg.get("stages", {}).get("resume", True)):
        shutil.rmtree(work_dir, ignore_errors=True)
    found = distributed.broadcast_from_rank_zero(checkpoint.is_file())
    return checkpoint if found else None


def _fit(
    cfg: DictConfig,
    stage_cfg: DictConfig,
    module: L.LightningModule,
    datasets: tuple[list[Any], list[Any]],
    collate: Any,
    saver: SaveWeights,
    run_dir: Path,
    work_dir: Path,
    wandb_run: Any | None,
    stage_prefix: str,
) -> FitResult:
    train_set, val_set = datasets
    train_sampler = EpochSampler(train_set, shuffle=True, seed=int(cfg.seed))
    # Own generators, so that loaders never draw from the global one that dropout uses.
    train_loader = DataLoader(
        train_set,
        batch_size=stage_cfg.train.batch_size,
        sampler=train_sampler,
        collate_fn=collate,
        generator=torch.Generator(),
    )
    val_loader = DataLoader(
        val_set,
        batch_size=stage_cfg.train.eval_batch_size,
        sampler=EpochSampler(val_set, shuffle=False, seed=int(cfg.seed)),
        collate_fn=collate,
        generator=torch.Generator(),
    )
    checkpoint_cfg = cfg.get("checkpoint") or {}
    state = TrainingState(
        work_dir / LAST_CHECKPOINT,
        train_sampler,
        batch_size=int(stage_cfg.train.batch_size),
        every_n_steps=int(checkpoint_cfg.get("every_n_steps", 0) or 0),
    )
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        default_root_dir=str(run_dir),
        logger=_loggers(run_dir, wandb_run, stage_prefix),
        callbacks=[saver, state, LearningRateMonitor(logging_interval="step")],
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,
        max_epochs=stage_cfg.train.epochs,
        max_steps=stage_cfg.train.get("max_steps") or -1,
        accumulate_grad_batches=stage_cfg.train.accumulate_grad_batches,
        gradient_clip_val=stage_cfg.train.gradient_clip_val,
        val_check_interval=stage_cfg.train.get("val_check_interval"),
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    resume_from = _resume_checkpoint(cfg, work_dir)
    if resume_from is not None and distributed.is_rank_zero():
        print(f"Resuming {stage_prefix or stage_cfg.get('name', 'training')} from {resume_from}")
    started = time.perf_counter()
    try:
        trainer.fit(
            module,
            train_dataloaders=train_loader,
            val_dataloaders=val_loader,
            ckpt_path=str(resume_from) if resume_from is not None else None,
        )
    except torch.cuda.OutOfMemoryError as error:
        stage = stage_prefix or stage_cfg.get("name", "training")
        raise UserError(out_of_memory_message(stage, int(stage_cfg.train.batch_size))) from error
    seconds = state.seconds_before + time.perf_counter() - started
    return FitResult(trainer, seconds, resume_from is not None)


def _finish_stage(work_dir: Path, out_dir: Path) -> None:
    """Rank zero moves the stage's weights to ``out_dir`` and drops its checkpoints; every
    rank waits, so that none reads the weights before they are there."""
    if distributed.is_rank_zero():
        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.copytree(work_dir / "model", out_dir, copy_function=link_or_copy)
        shutil.rmtree(work_dir, ignore_errors=True)
    distributed.barrier()


def _compute_metrics(
    stage: str,
    seconds: float,
    module: Any,
    model: torch.nn.Module,
    steps: int,
    reference_tokens: int = 0,
) -> dict[str, float]:
    total, trainable = count_parameters(model)
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
    }


def _encode_split(
    task: Task, tokenizer: Any, examples: list[dict[str, Any]], max_length: int
) -> tuple[list[EncodedExample], int]:
    encoded = [
        encode_example(tokenizer, task.messages(e), task.target_text(e), max_length)
        for e in examples
    ]
    return encoded, sum(e.truncated for e in encoded)


# ----------------------------------------------------------------------------- SFT stage


def sft_stage_key(
    cfg: DictConfig, stage_cfg: DictConfig, task_cfg: DictConfig, splits: dict[str, list]
) -> str:
    """Content hash of everything that determines an SFT stage's weights."""
    task_payload = {k: v for k, v in (_container(task_cfg) or {}).items() if k != "judge"}
    return fingerprint(
        {
            "model": _container(cfg.model),
            "task": task_payload,
            "train": fingerprint(splits["train"]),
            "val": fingerprint(splits["val"]),
            # Only what the stage trains with: a sweep may graft unrelated keys onto it.
            "stage": {k: _container(stage_cfg.get(k)) for k in ("module", "train", "save")},
            "trainer": _container(cfg.trainer),
            "seed": int(cfg.seed),
        }
    )[:20]


def _publish_to_cache(weights: Path, metrics: dict[str, float], cache_entry: Path) -> None:
    """Hard-link (or copy) finished weights into the cache; the marker is written last and
    the entry appears with one rename, so a half-written entry is never taken as a result."""
    if (cache_entry / STAGE_COMPLETE).is_file():
        return
    cache_entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache_entry.name}.", dir=cache_entry.parent))
    try:
        shutil.copytree(weights, staging / "model", copy_function=link_or_copy)
        write_json_atomic(staging / STAGE_COMPLETE, metrics)
        if cache_entry.exists():
            shutil.rmtree(cache_entry)  # an incomplete leftover: never reused
        os.replace(staging, cache_entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def run_sft_stage(
    cfg: DictConfig,
    stage_cfg: DictConfig,
    task: Task,
    splits: dict[str, list[dict[str, Any]]],
    run_dir: Path,
    out_dir: Path,
    wandb_run: Any | None,
    *,
    stage_prefix: str = "",
) -> StageResult:
    key = sft_stage_key(cfg, stage_cfg, cfg.task, splits)
    cache_entry = _sft_cache_entry(cfg, key)
    work_dir = _work_dir(cfg, f"sft-{key}")
    reuse = bool(cfg.get("stages", {}).get("reuse", True))
    with _stage_lock(work_dir):
        # Looked up under the lock: an identical job may have just finished it.
        cached = distributed.broadcast_from_rank_zero(
            reuse and (cache_entry / STAGE_COMPLETE).is_file()
        )
        if cached:
            metrics = json.loads((cache_entry / STAGE_COMPLETE).read_text())
            metrics["compute/sft/reused"] = 1.0
            log.info("Reusing the finished SFT stage %s", cache_entry)
            if distributed.is_rank_zero():
                print(f"Reusing the finished SFT stage from {cache_entry}")
            return StageResult(cache_entry / "model", metrics, key)
        return _train_sft(
            cfg, stage_cfg, task, splits, run_dir, out_dir, wandb_run, stage_prefix, key
        )


def _train_sft(
    cfg: DictConfig,
    stage_cfg: DictConfig,
    task: Task,
    splits: dict[str, list[dict[str, Any]]],
    run_dir: Path,
    out_dir: Path,
    wandb_run: Any | None,
    stage_prefix: str,
    key: str,
) -> StageResult:
    work_dir = _work_dir(cfg, f"sft-{key}")
    loaded, lineage = load_for_training(cfg.model, cfg.paths.cache_dir)
    tokenizer = loaded.tokenizer
    max_length = int(cfg.model.max_length)
    train_set, train_truncated = _encode_split(task, tokenizer, splits["train"], max_length)
    val_set, val_truncated = _encode_split(task, tokenizer, splits["val"], max_length)
    module = instantiate(stage_cfg.module, model=loaded.model)
    saver = SaveWeights(
        work_dir / "model",
        tokenizer,
        monitor="eval/loss",
        save=stage_cfg.save,
        info={
            **lineage,
            "model": cfg.model.name,
            "task": task.name,
            "method": "sft",
            "stage_key": key,
        },
    )
    fit = _fit(
        cfg,
        stage_cfg,
        module,
        (train_set, val_set),
        partial(collate_sft, pad_token_id=tokenizer.pad_token_id),
        saver,
        run_dir,
        work_dir,
        wandb_run,
        stage_prefix,
    )
    metrics = _compute_metrics("sft", fit.seconds, module, loaded.model, fit.trainer.global_step)
    metrics.update(
        {
            "compute/sft/reused": 0.0,
            "compute/sft/resumed": float(fit.resumed),
            "data/train_examples": float(len(train_set)),
            "data/train_truncated": float(train_truncated),
            "data/val_examples": float(len(val_set)),
            "data/val_truncated": float(val_truncated),
            "train/sft/best_eval_loss": float(saver.best)
            if saver.best is not None
            else float("nan"),
        }
    )
    if distributed.is_rank_zero():
        _publish_to_cache(work_dir / "model", metrics, _sft_cache_entry(cfg, key))
    _finish_stage(work_dir, out_dir)
    del module, loaded
    return StageResult(out_dir, metrics, key)


# ----------------------------------------------------------------------------- DPO stage


def _sampler(model: Any, tokenizer: Any, task: Task, cfg: DictConfig) -> Any:
    def sample(examples: list[dict[str, Any]], count: int) -> list[list[str]]:
        prompts = [encode_prompt(tokenizer, task.messages(e)) for e in examples]
        return generate_sampled(
            model,
            tokenizer,
            prompts,
            samples=count,
            max_new_tokens=task.max_new_tokens,
            temperature=float(cfg.method.pairs.temperature),
            batch_size=int(cfg.eval.batch_size),
            seed=int(cfg.method.pairs.seed),
            show_progress=bool(cfg.eval.progress_bar),
        )

    return sample


def _encode_pairs(pairs: list, tokenizer: Any, max_length: int) -> tuple[list[EncodedPair], int]:
    encoded = [encode_pair(tokenizer, p.messages, p.chosen, p.rejected, max_length) for p in pairs]
    return encoded, sum(e.truncated for e in encoded)


def pair_collate(share_prompt: bool) -> Any:
    return collate_pairs_shared_prompt if share_prompt else collate_pairs


def collate_with_reference(
    items: list[tuple[EncodedPair, float, float]], pad_token_id: int, share_prompt: bool
) -> dict[str, torch.Tensor]:
    batch = pair_collate(share_prompt)([item[0] for item in items], pad_token_id)
    batch["ref_chosen_logps"] = torch.tensor([item[1] for item in items], dtype=torch.float32)
    batch["ref_rejected_logps"] = torch.tensor([item[2] for item in items], dtype=torch.float32)
    return batch


def reference_logps_cached(
    model: torch.nn.Module,
    encoded: list[EncodedPair],
    *,
    pad_token_id: int,
    batch_size: int,
    cache_file: Path,
    share_prompt: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Reference log-probs of ``encoded`` pairs, from ``cache_file`` when present. Otherwise
    every rank scores its shard and the shards are gathered in order; rank zero writes the
    file atomically, so an interrupted run never leaves a truncated cache behind."""
    saved = None
    if distributed.is_rank_zero() and cache_file.is_file():
        saved = torch.load(cache_file)
        if saved["chosen"].numel() != len(encoded):
            saved = None
    saved = distributed.broadcast_from_rank_zero(saved)
    if saved is not None:
        return saved["chosen"], saved["rejected"], 0, True
    loader = DataLoader(
        distributed.my_shard(encoded),  # type: ignore[arg-type]
        batch_size=batch_size,
        collate_fn=partial(pair_collate(share_prompt), pad_token_id=pad_token_id),
    )
    shards = distributed.gather_to_all(precompute_reference_logps(model, loader))
    chosen = torch.cat([shard[0] for shard in shards])
    rejected = torch.cat([shard[1] for shard in shards])
    tokens = sum(shard[2] for shard in shards)
    if distributed.is_rank_zero():
        with atomic_open(cache_file) as handle:
            torch.save({"chosen": chosen, "rejected": rejected}, handle)
    return chosen, rejected, tokens, False


def run_dpo_stage(
    cfg: DictConfig,
    task: Task,
    splits: dict[str, list[dict[str, Any]]],
    init: StageResult | None,
    run_dir: Path,
    wandb_run: Any | None,
) -> StageResult:
    method = cfg.method
    init_weights = init.weights if init is not None else None
    loaded, lineage = load_for_training(cfg.model, cfg.paths.cache_dir, init_weights)
    # Sampling and the reference pass run before fit: on the device training will use.
    policy, tokenizer = loaded.model.to(distributed.device_for(cfg.trainer)), loaded.tokenizer
    max_length = int(cfg.model.max_length)
    pad_id = tokenizer.pad_token_id
    pair_cfg = method.pairs
    # Checkpointed layers keep no KV cache, which the shared-prompt pass needs.
    share_prompt = bool(method.get("share_prompt", True)) and not uses_gradient_checkpointing(
        policy
    )
    needs_sampler = pair_cfg.source in ("on_policy", "auto")
    sampler = _sampler(policy, tokenizer, task, cfg) if needs_sampler else None
    pair_counts: dict[str, float] = {}
    encoded: dict[str, list[EncodedPair]] = {}
    truncated = 0
    for split in ("train", "val"):
        pairs, counts = build_pairs(
            task,
            splits[split],
            source=str(pair_cfg.source),
            seed=int(pair_cfg.seed),
            sampler=sampler,
            samples_per_example=int(pair_cfg.samples_per_example),
            max_pairs_per_example=int(pair_cfg.max_pairs_per_example),
        )
        if not pairs:
            raise UserError(
                f"no preference pairs for the {split} split of task '{task.name}' from source "
                f"'{pair_cfg.source}' ({counts}); give a 'rejected' field or use on_policy"
            )
        pair_counts.update({f"{key}/{split}": float(v) for key, v in counts.items()})
        encoded[split], cut = _encode_pairs(pairs, tokenizer, max_length)
        truncated += cut
    reference_model = None
    if method.reference == "copy":
        if hasattr(policy, "peft_config"):
            raise UserError(
                "method.reference=copy with model.lora.enabled=true would copy the whole model "
                "for nothing: use method.reference=adapter_disabled (or precompute)"
            )
        reference_model = copy.deepcopy(policy)
    reference_tokens = 0
    items: dict[str, list[Any]] = {}
    cache_hits = 0
    for split in ("train", "val"):
        if method.reference == "precompute":
            reference_key = fingerprint(
                {
                    "weights": init.key if init is not None else _container(cfg.model),
                    "share_prompt": share_prompt,
                    "pairs": [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in encoded[split]],
                }
            )[:24]
            cache_file = Path(cfg.paths.cache_dir) / "reference" / f"{reference_key}.pt"
            chosen, rejected, tokens, hit = reference_logps_cached(
                policy,
                encoded[split],
                pad_token_id=pad_id,
                batch_size=int(method.train.eval_batch_size),
                cache_file=cache_file,
                share_prompt=share_prompt,
            )
            reference_tokens += tokens if split == "train" else 0
            cache_hits += int(hit)
            items[split] = list(
                zip(encoded[split], chosen.tolist(), rejected.tolist(), strict=True)
            )
        else:
            items[split] = [(pair, 0.0, 0.0) for pair in encoded[split]]
    key = fingerprint(
        {
            "init": init.key if init is not None else None,
            "model": _container(cfg.model),
            "task": {k: v for k, v in (_container(cfg.task) or {}).items() if k != "judge"},
            "method": _container(method),
            "pairs": {
                split: fingerprint([dataclasses.astuple(p) for p in encoded[split]])
                for split in encoded
            },
            "trainer": _container(cfg.trainer),
            "seed": int(cfg.seed),
        }
    )[:20]
    work_dir = _work_dir(cfg, f"dpo-{key}")
    module = instantiate(
        method.module, model=policy, reference=method.reference, reference_model=reference_model
    )
    extra_dirs = {}
    if lineage.get("merged_adapter") and init_weights is not None:
        extra_dirs[lineage["merged_adapter"]] = init_weights
    saver = SaveWeights(
        work_dir / "model",
        tokenizer,
        monitor="eval/loss",
        save=method.save,
        info={**lineage, "model": cfg.model.name, "task": task.name, "method": method.name},
        extra_dirs=extra_dirs,
    )
    collate = partial(collate_with_reference, pad_token_id=pad_id, share_prompt=share_prompt)
    with _stage_lock(work_dir):
        fit = _fit(
            cfg,
            method,
            module,
            (items["train"], items["val"]),
            collate,
            saver,
            run_dir,
            work_dir,
            wandb_run,
            "",
        )
        _finish_stage(work_dir, run_dir / "model")
    reference_tokens += sum(distributed.gather_to_all(module.reference_tokens))
    metrics = _compute_metrics(
        "dpo",
        fit.seconds,
        module,
        policy,
        fit.trainer.global_step,
        reference_tokens=reference_tokens,
    )
    metrics.update(pair_counts)
    metrics["compute/dpo/resumed"] = float(fit.resumed)
    metrics["compute/dpo/reference_cache_hits"] = float(cache_hits)
    metrics["compute/dpo/shared_prompt"] = float(share_prompt)
    metrics["data/pairs_truncated"] = float(truncated)
    metrics["train/dpo/best_eval_loss"] = (
        float(saver.best) if saver.best is not None else float("nan")
    )
    return StageResult(run_dir / "model", metrics, "")


def total_compute(metrics: dict[str, float], stages: list[str]) -> dict[str, float]:
    """Totals over the stages a method ran (a reused stage counts: its cost was paid)."""
    totals: dict[str, float] = {}
    for figure in (
        "train_seconds",
        "tokens",
        "padding_tokens",
        "reference_tokens",
        "flops_estimate",
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


def manifest_of(weights: Path) -> dict[str, Any]:
    return json.loads((weights / CHECKPOINT_MANIFEST).read_text())
