"""The train → evaluate flow behind train.py and evaluate.py (kept out of the entry points so
tests and sweeps call it directly)."""

from __future__ import annotations

import gc
import logging
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from clintune import distributed
from clintune.compute import peak_memory_bytes
from clintune.errors import UserError, require_accelerator
from clintune.eval.runner import EvalResult, generate_outputs, score_outputs
from clintune.io import write_json_atomic, write_jsonl_atomic
from clintune.models.loading import load_model, read_checkpoint_manifest
from clintune.privacy import text_policy
from clintune.stages import (
    StageResult,
    fingerprint,
    link_or_copy,
    manifest_of,
    run_dpo_stage,
    run_sft_stage,
    total_compute,
)
from clintune.tasks.base import Task
from clintune.tasks.data import find_leakage
from clintune.tracking import finish_wandb, log_results, start_wandb

log = logging.getLogger(__name__)

WEIGHTS_DIR = "model"


def _train(
    cfg: DictConfig,
    task: Task,
    splits: dict[str, list[dict[str, Any]]],
    run_dir: Path,
    wandb_run: Any | None,
) -> dict[str, float]:
    """Run the method's stages; leaves the final weights in ``run_dir/model``."""
    method = cfg.method
    kind = method.get("kind", "sft")
    metrics: dict[str, float] = {}
    stages: list[str] = []
    if kind == "sft":
        result = run_sft_stage(cfg, method, task, splits, run_dir, run_dir / WEIGHTS_DIR, wandb_run)
        if result.weights != run_dir / WEIGHTS_DIR and distributed.is_rank_zero():
            # Reused from the cache: the run directory still gets its own weights.
            shutil.copytree(result.weights, run_dir / WEIGHTS_DIR, copy_function=link_or_copy)
        distributed.barrier()
        metrics.update(result.metrics)
        stages.append("sft")
    elif kind == "dpo":
        init: StageResult | None = None
        if method.get("init_from"):
            weights = Path(str(method.init_from))
            init = StageResult(
                weights, {}, fingerprint([str(weights.resolve()), manifest_of(weights)])
            )
        elif method.get("sft") is not None:
            init = run_sft_stage(
                cfg,
                method.sft,
                task,
                splits,
                run_dir,
                run_dir / "sft_model",
                wandb_run,
                stage_prefix="sft",
            )
            metrics.update(init.metrics)
            stages.append("sft")
        gc.collect()
        result = run_dpo_stage(cfg, task, splits, init, run_dir, wandb_run)
        metrics.update(result.metrics)
        stages.append("dpo")
    else:
        raise ValueError(f"method.kind must be sft or dpo, got {kind!r}")
    metrics.update(total_compute(metrics, stages))
    return metrics


def _evaluate(
    cfg: DictConfig, task: Task, test: list[dict[str, Any]], checkpoint: Path | None
) -> tuple[EvalResult | None, dict[str, float]]:
    """Every rank generates for its shard of the test set; rank zero gathers the outputs in
    order and scores them (other ranks get ``None``)."""
    loaded = load_model(cfg.model, cfg.paths.cache_dir, checkpoint=checkpoint)
    model = loaded.model.to(distributed.device_for(cfg.trainer))
    if cfg.eval.get("limit"):
        test = test[: int(cfg.eval.limit)]
    started = time.perf_counter()
    outputs, truncated = generate_outputs(
        model,
        loaded.tokenizer,
        task,
        distributed.my_shard(test),
        max_prompt_length=int(cfg.model.max_length) - task.max_new_tokens,
        batch_size=int(cfg.eval.batch_size),
        show_progress=bool(cfg.eval.progress_bar) and distributed.is_rank_zero(),
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
        bootstrap=OmegaConf.to_container(cfg.eval.bootstrap, resolve=True),  # type: ignore[arg-type]
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
    require_accelerator(str(cfg.trainer.get("accelerator", "cpu")))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    task: Task = instantiate(cfg.task, _convert_="partial")
    trains = train and cfg.method.get("kind", "none") != "none"
    splits = {split: task.load_split(split) for split in (("train", "val") if trains else ())}
    splits["test"] = task.load_split("test")
    leaked = check_leakage(task, splits) if trains else []
    for split in ("train", "val"):
        # An explicit, recorded cut for quick runs (data/train_examples says what was used).
        limit = (cfg.get("subsample") or {}).get(split)
        if limit and split in splits:
            splits[split] = splits[split][: int(limit)]
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
        )
        if writer
        else None
    )
    failed = True
    try:
        metrics: dict[str, float] = {}
        if trains:
            metrics["data/leaked_test_examples"] = float(len(leaked))
            metrics.update(_train(cfg, task, splits, run_dir, wandb_run))
            gc.collect()
            checkpoint = run_dir / WEIGHTS_DIR
        result, eval_compute = _evaluate(cfg, task, splits["test"], checkpoint)
        if result is None:
            failed = False
            return {}
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
                may_log_text=policy.may_log_text,
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
    return distributed.launch(cfg, out_dir, partial(run, checkpoint=weights, train=False))
