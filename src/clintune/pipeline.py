"""The train → evaluate flow behind train.py and evaluate.py (kept out of the entry points so
tests and sweeps call it directly)."""

from __future__ import annotations

import gc
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from clintune.compute import peak_memory_bytes, training_flops
from clintune.eval.runner import EvalResult, evaluate_task
from clintune.io import write_json_atomic, write_jsonl_atomic
from clintune.models.loading import (
    count_parameters,
    load_model,
    read_checkpoint_manifest,
    save_trained,
)
from clintune.tasks.base import Task
from clintune.tasks.data import find_leakage
from clintune.tokenization import EncodedExample, collate_sft, encode_example
from clintune.tracking import finish_wandb, log_results, start_wandb

log = logging.getLogger(__name__)

WEIGHTS_DIR = "model"


class SaveWeights(Callback):
    """Keeps the best (lowest monitored value) or last weights in the run directory in
    Hugging Face format: full weights, or only the adapter under LoRA."""

    def __init__(
        self, dirpath: Path, tokenizer: Any, *, monitor: str, save: str, info: dict[str, Any]
    ) -> None:
        if save not in {"best", "last"}:
            raise ValueError(f"method.save must be 'best' or 'last', got {save!r}")
        self.dirpath = dirpath
        self.tokenizer = tokenizer
        self.monitor = monitor
        self.save = save
        self.info = info
        self.best: float | None = None
        self.saved_step: int | None = None

    def _write(self, trainer: L.Trainer, module: L.LightningModule, value: float | None) -> None:
        if trainer.is_global_zero:
            info = {**self.info, "step": trainer.global_step, self.monitor: value}
            save_trained(module.model, self.tokenizer, self.dirpath, info)
        self.saved_step = trainer.global_step

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.save != "best":
            return
        metric = trainer.callback_metrics.get(self.monitor)
        if metric is None:
            return
        value = float(metric)
        if self.best is None or value < self.best:
            self.best = value
            self._write(trainer, module, value)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.save == "last" or self.saved_step is None:
            self._write(trainer, module, None)


def _encode_split(
    task: Task, tokenizer: Any, examples: list[dict[str, Any]], max_length: int
) -> tuple[list[EncodedExample], int]:
    encoded = [
        encode_example(tokenizer, task.messages(e), task.target_text(e), max_length)
        for e in examples
    ]
    return encoded, sum(e.truncated for e in encoded)


def _loader(
    encoded: list[EncodedExample], batch_size: int, pad_id: int, shuffle: bool
) -> DataLoader:
    return DataLoader(
        encoded,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=partial(collate_sft, pad_token_id=pad_id),
    )


def _train(
    cfg: DictConfig,
    task: Task,
    splits: dict[str, list[dict[str, Any]]],
    run_dir: Path,
    wandb_run: Any | None,
) -> dict[str, float]:
    """Fit the method's module; leaves the chosen weights in ``run_dir/model``."""
    method = cfg.method
    loaded = load_model(cfg.model, cfg.paths.cache_dir, trainable_lora=True)
    tokenizer = loaded.tokenizer
    max_length = int(cfg.model.max_length)
    train_set, train_truncated = _encode_split(task, tokenizer, splits["train"], max_length)
    val_set, val_truncated = _encode_split(task, tokenizer, splits["val"], max_length)
    module = instantiate(method.module, model=loaded.model)
    loggers: list[Any] = [CSVLogger(save_dir=str(run_dir), name="logs", version="")]
    if wandb_run is not None:
        loggers.append(WandbLogger(experiment=wandb_run, log_model=False))
    total_params, trainable_params = count_parameters(loaded.model)
    saver = SaveWeights(
        run_dir / WEIGHTS_DIR,
        tokenizer,
        monitor="val/loss",
        save=method.save,
        info={
            "base_model": loaded.source,
            "model": cfg.model.name,
            "task": task.name,
            "method": method.name,
        },
    )
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        default_root_dir=str(run_dir),
        logger=loggers,
        callbacks=[saver, LearningRateMonitor(logging_interval="step")],
        max_epochs=method.train.epochs,
        max_steps=method.train.get("max_steps") or -1,
        accumulate_grad_batches=method.train.accumulate_grad_batches,
        gradient_clip_val=method.train.gradient_clip_val,
        val_check_interval=method.train.get("val_check_interval"),
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    pad_id = tokenizer.pad_token_id
    started = time.perf_counter()
    trainer.fit(
        module,
        train_dataloaders=_loader(train_set, method.train.batch_size, pad_id, shuffle=True),
        val_dataloaders=_loader(val_set, method.train.eval_batch_size, pad_id, shuffle=False),
    )
    seconds = time.perf_counter() - started
    stage = method.name
    tokens = module.tokens_trained
    return {
        f"compute/{stage}/train_seconds": seconds,
        f"compute/{stage}/tokens": float(tokens),
        f"compute/{stage}/padding_tokens": float(module.padding_tokens_trained),
        f"compute/{stage}/flops_estimate": training_flops(total_params, trainable_params, tokens),
        f"compute/{stage}/optimizer_steps": float(trainer.global_step),
        "compute/train_seconds": seconds,
        "compute/tokens": float(tokens),
        "compute/padding_tokens": float(module.padding_tokens_trained),
        "compute/flops_estimate": training_flops(total_params, trainable_params, tokens),
        "compute/parameters": float(total_params),
        "compute/trainable_parameters": float(trainable_params),
        "data/train_examples": float(len(train_set)),
        "data/train_truncated": float(train_truncated),
        "data/val_examples": float(len(val_set)),
        "data/val_truncated": float(val_truncated),
        "train/best_val_loss": float(saver.best) if saver.best is not None else float("nan"),
    }


def _evaluate(
    cfg: DictConfig, task: Task, test: list[dict[str, Any]], checkpoint: Path | None
) -> tuple[EvalResult, dict[str, float]]:
    loaded = load_model(cfg.model, cfg.paths.cache_dir, checkpoint=checkpoint)
    if cfg.eval.get("limit"):
        test = test[: int(cfg.eval.limit)]
    started = time.perf_counter()
    result = evaluate_task(
        loaded.model,
        loaded.tokenizer,
        task,
        test,
        max_prompt_length=int(cfg.model.max_length) - task.max_new_tokens,
        batch_size=int(cfg.eval.batch_size),
        show_progress=bool(cfg.eval.progress_bar),
        bootstrap=OmegaConf.to_container(cfg.eval.bootstrap, resolve=True),  # type: ignore[arg-type]
    )
    seconds = time.perf_counter() - started
    return result, {"compute/eval_seconds": seconds}


class LeakageError(ValueError):
    """Test examples also seen in training: the study's comparison would be invalid."""


def check_leakage(task: Task, splits: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Test ids that also occur in train or val (same id, or same normalised input text).
    Fails unless ``task.data.allow_leakage`` downgrades it to a counted warning."""
    seen = splits["train"] + splits.get("val", [])
    leaked = find_leakage(seen, splits["test"], task.input_text)
    if not leaked:
        return leaked
    message = (
        f"{len(leaked)} test example(s) of task '{task.name}' also occur in train/val "
        f"(same id or same normalised text), e.g. {leaked[:5]}; test metrics would be inflated"
    )
    if not task.data.get("allow_leakage", False):
        raise LeakageError(
            message + ". Fix the splits, or set task.data.allow_leakage=true to go on "
            "with a warning (counted as data/leaked_test_examples in metrics.json)."
        )
    log.warning(message)
    return leaked


def run(
    cfg: DictConfig, run_dir: Path, *, checkpoint: Path | None = None, train: bool = True
) -> dict[str, float]:
    """Train (unless the method is ``base`` or ``train`` is off), evaluate on the test split,
    write the run directory's files and the W&B run. Returns what metrics.json holds."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    task: Task = instantiate(cfg.task, _convert_="partial")
    trains = train and cfg.method.get("module") is not None
    splits = {split: task.load_split(split) for split in (("train", "val") if trains else ())}
    splits["test"] = task.load_split("test")
    leaked = check_leakage(task, splits) if trains else []
    wandb_run = start_wandb(cfg, run_dir, job_type="train" if trains else "evaluate")
    failed = True
    try:
        metrics: dict[str, float] = {}
        if trains:
            metrics["data/leaked_test_examples"] = float(len(leaked))
        if trains:
            metrics.update(_train(cfg, task, splits, run_dir, wandb_run))
            gc.collect()
            checkpoint = run_dir / WEIGHTS_DIR
        result, eval_compute = _evaluate(cfg, task, splits["test"], checkpoint)
        metrics.update(eval_compute)
        metrics.update({f"test/{key}": value for key, value in result.metrics.items()})
        metrics["compute/peak_memory_bytes"] = float(peak_memory_bytes())
        write_jsonl_atomic(run_dir / "predictions.jsonl", result.predictions)
        # metrics.json is written last: its presence marks a finished run.
        write_json_atomic(run_dir / "metrics.json", metrics)
        if wandb_run is not None:
            log_results(
                wandb_run,
                metrics,
                result.predictions,
                result.inputs,
                sensitive=task.contains_sensitive_text,
            )
        headline = f"test/{task.headline_metric}"
        print(f"\nResults in {run_dir}")
        print(f"  {headline} = {metrics[headline]:.4f}  (n={int(metrics['test/n'])})")
        failed = False
        return metrics
    finally:
        finish_wandb(wandb_run, failed)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def config_summary(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def _config_of_run(run_dir: Path, current: DictConfig) -> DictConfig:
    """A finished run's own config, with this machine's paths, logger and hardware."""
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert isinstance(saved, DictConfig)
    for key in ("paths", "logger", "trainer"):
        saved[key] = current[key]
    saved.checkpoint = str(run_dir)
    return saved


def evaluate_checkpoint(cfg: DictConfig, out_dir: Path) -> dict[str, float]:
    """evaluate.py: the same evaluation as train.py's, for a model, a weights directory or a
    whole run directory (whose saved config then decides model, task, method and eval)."""
    checkpoint = Path(str(cfg.checkpoint)) if cfg.get("checkpoint") else None
    weights: Path | None = checkpoint
    if checkpoint is not None and (checkpoint / ".hydra" / "config.yaml").is_file():
        cfg = _config_of_run(checkpoint, cfg)
        weights = checkpoint / WEIGHTS_DIR if (checkpoint / WEIGHTS_DIR).is_dir() else None
    elif checkpoint is not None:
        manifest = read_checkpoint_manifest(checkpoint)
        cfg.method.name = manifest.get("method", cfg.method.name)
    return run(cfg, out_dir, checkpoint=weights, train=False)
