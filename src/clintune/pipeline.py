"""The train → evaluate flow behind train.py and evaluate.py (kept out of the entry points so
tests and sweeps call it directly)."""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from clintune import distributed, rundir
from clintune.compute import peak_memory_bytes, total_compute
from clintune.console import quiet_console
from clintune.errors import UserError, require_accelerator
from clintune.eval.runner import EvalResult, generate_outputs, score_outputs
from clintune.io import write_json_atomic, write_jsonl_atomic
from clintune.models.loading import load_model, read_checkpoint_manifest
from clintune.privacy import text_policy
from clintune.settings import (
    PREFERENCE_SETTINGS,
    ConfigError,
    EvalSettings,
    SFTSettings,
    settings_from,
)
from clintune.stages import (
    StageContext,
    StageResult,
    run_preference_stage,
    run_sft_stage,
    start_from_checkpoint,
)
from clintune.tasks.base import Task, headline_record
from clintune.tasks.data import find_leakage
from clintune.tracking import finish_wandb, log_results, start_wandb

log = logging.getLogger(__name__)


def _train(ctx: StageContext) -> dict[str, float]:
    """Run the method's stages; the last leaves the final weights in ``run_dir/model``."""
    method, weights = ctx.settings.method, ctx.run_dir / rundir.WEIGHTS
    metrics: dict[str, float] = {}
    stages: list[str] = []
    if isinstance(method, SFTSettings):
        metrics.update(run_sft_stage(ctx, method, weights).metrics)
        stages.append("sft")
    elif isinstance(method, PREFERENCE_SETTINGS):
        init: StageResult | None = None
        if method.init_from is not None:
            init = start_from_checkpoint(Path(method.init_from))
        elif method.sft_stage is not None:
            sft_weights = ctx.run_dir / rundir.SFT_WEIGHTS
            init = run_sft_stage(ctx, method.sft_stage, sft_weights, stage_prefix="sft")
            metrics.update(init.metrics)
            stages.append("sft")
        metrics.update(run_preference_stage(ctx, method, init, weights).metrics)
        stages.append(method.kind)
    metrics.update(total_compute(metrics, stages))
    return metrics


def _evaluate(
    cfg: DictConfig,
    eval_settings: EvalSettings,
    task: Task,
    test: list[dict[str, Any]],
    checkpoint: Path | None,
) -> tuple[EvalResult | None, dict[str, float]]:
    """Every rank generates for its shard of the test set; rank zero gathers the outputs in
    order and scores them (other ranks get ``None``)."""
    loaded = load_model(cfg.model, cfg.paths.cache_dir, checkpoint=checkpoint)
    model = loaded.model.to(distributed.device_for(cfg.trainer))
    if eval_settings.limit is not None:
        test = test[: eval_settings.limit]
    started = time.perf_counter()
    outputs, truncated = generate_outputs(
        model,
        loaded.tokenizer,
        task,
        distributed.my_shard(test),
        max_prompt_length=int(cfg.model.max_length) - task.max_new_tokens,
        batch_size=eval_settings.batch_size,
        show_progress=eval_settings.progress_bar and distributed.is_rank_zero(),
    )
    shards = distributed.gather_to_all((outputs, truncated))
    seconds = time.perf_counter() - started
    if not distributed.is_rank_zero():
        return None, {}
    result = score_outputs(
        task,
        test,
        [output for shard in shards for output in shard[0]],
        truncated=sum(shard[1] for shard in shards),
        bootstrap=dataclasses.asdict(eval_settings.bootstrap),
    )
    return result, {"compute/eval_seconds": seconds, "compute/eval_processes": len(shards)}


class LeakageError(UserError, ValueError):
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
    settings = settings_from(cfg)  # every config problem at once, before anything loads
    quiet_console()
    trains = train and settings.method.kind != "none"
    if trains and None in (settings.stages, settings.checkpoint, settings.subsample):
        raise ConfigError(["training needs the stages, checkpoint and subsample sections"])
    require_accelerator(settings.trainer.accelerator)
    L.seed_everything(settings.seed, workers=True, verbose=False)
    task: Task = instantiate(cfg.task, _convert_="partial")
    splits = {split: task.load_split(split) for split in (("train", "val") if trains else ())}
    splits["test"] = task.load_split("test")
    leaked = check_leakage(task, splits) if trains else []
    if settings.subsample is not None:
        # An explicit, recorded cut for quick runs (data/train_examples says what was used).
        for split, limit in (("train", settings.subsample.train), ("val", settings.subsample.val)):
            if limit is not None and split in splits:
                splits[split] = splits[split][:limit]
    # Only rank zero writes: files, the W&B run, the console summary.
    writer = distributed.is_rank_zero()
    policy = text_policy(task.data, list(splits))
    if writer and not policy.may_log_text and cfg.logger.get("backend") == "wandb":
        log.info(policy.withheld_message())
    wandb_run = (
        start_wandb(
            cfg,
            run_dir,
            job_type="train" if trains else "evaluate",
            capture_console=policy.may_log_text,
            extra_config=headline_record(cfg),
        )
        if writer
        else None
    )
    failed = True
    try:
        metrics: dict[str, float] = {}
        if trains:
            metrics["data/leaked_test_examples"] = float(len(leaked))
            context = StageContext(cfg, settings, task, splits, run_dir, wandb_run)
            metrics.update(_train(context))
            gc.collect()
            checkpoint = run_dir / rundir.WEIGHTS
        result, eval_compute = _evaluate(cfg, settings.eval, task, splits["test"], checkpoint)
        if result is None:
            failed = False
            return {}
        metrics.update(eval_compute)
        metrics.update({f"test/{key}": value for key, value in result.metrics.items()})
        metrics["compute/peak_memory_bytes"] = float(peak_memory_bytes())
        write_jsonl_atomic(run_dir / rundir.PREDICTIONS, result.predictions)
        # metrics.json is written last: its presence marks a finished run.
        write_json_atomic(run_dir / rundir.METRICS, metrics)
        if wandb_run is not None:
            log_results(
                wandb_run,
                metrics,
                result.predictions,
                result.inputs,
                may_log_text=policy.may_log_text,
            )
        headline = f"test/{task.headline_metric}"
        print(f"\nResults in {run_dir}")
        print(f"  {headline} = {metrics[headline]:.4f}  (n={int(metrics['test/n'])})")
        if wandb_run is not None and wandb_run.settings.mode == "offline":
            print(f"  W&B run (offline): upload with `wandb sync {Path(wandb_run.dir).parent}`")
        failed = False
        return metrics
    finally:
        finish_wandb(wandb_run, failed)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _config_of_run(run_dir: Path, current: DictConfig) -> DictConfig:
    """A finished run's own config, with this machine's paths, logger and hardware."""
    saved = OmegaConf.load(run_dir / rundir.HYDRA_CONFIG)
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
    if checkpoint is not None and (checkpoint / rundir.HYDRA_CONFIG).is_file():
        cfg = _config_of_run(checkpoint, cfg)
        weights = checkpoint / rundir.WEIGHTS if (checkpoint / rundir.WEIGHTS).is_dir() else None
    elif checkpoint is not None:
        manifest = read_checkpoint_manifest(checkpoint)
        cfg.method.name = manifest.get("method", cfg.method.name)
    return distributed.launch(cfg, out_dir, partial(run, checkpoint=weights, train=False))
