"""The SFT stage: cross-entropy on the answer tokens, published to a content-addressed cache
so that ``method=sft`` and the SFT stage of ``method=dpo`` train it once between them."""

from __future__ import annotations

import dataclasses
import json
import shutil
from functools import partial
from pathlib import Path

from hydra.utils import instantiate

from clintune import distributed
from clintune.compute import stage_compute
from clintune.io import build_directory_once, content_hash, link_or_copy, write_json_atomic
from clintune.models.loading import load_for_training
from clintune.settings import SFTSettings
from clintune.stages.common import (
    StageContext,
    StageResult,
    best_key,
    container,
    encode_split,
    fit,
    hand_over,
    saver_and_callbacks,
    stage_lock,
    task_payload,
)
from clintune.tokenization import collate_sft

STAGE_COMPLETE = "stage.json"


def sft_stage_key(ctx: StageContext, stage: SFTSettings) -> str:
    """Content hash of everything that determines an SFT stage's weights. The stage's name
    and kind do not: ``method=sft`` and ``method=dpo``'s SFT stage share the key."""
    cfg = ctx.cfg
    return content_hash(
        {
            "model": container(cfg.model),
            "task": task_payload(cfg),
            "train": content_hash(ctx.splits["train"], 64),
            "val": content_hash(ctx.splits["val"], 64),
            "stage": {
                "module": dataclasses.asdict(stage.module),
                "train": dataclasses.asdict(stage.train),
                "save": stage.save,
            },
            "trainer": container(cfg.trainer),
            "seed": ctx.settings.seed,
        }
    )


def sft_cache_entry(ctx: StageContext, key: str) -> Path:
    """Where a finished SFT stage is published for reuse."""
    return ctx.cache_dir / "stages" / f"sft-{key}"


def run_sft_stage(
    ctx: StageContext, stage: SFTSettings, out_dir: Path, *, stage_prefix: str = ""
) -> StageResult:
    """Train (or reuse) the SFT stage; its weights end up in ``out_dir`` either way."""
    key = sft_stage_key(ctx, stage)
    cache_entry = sft_cache_entry(ctx, key)
    work_dir = ctx.work_dir(f"sft-{key}")
    assert ctx.settings.stages is not None
    with stage_lock(work_dir):
        # Looked up under the lock: an identical job may have just finished it.
        cached = distributed.broadcast_from_rank_zero(
            ctx.settings.stages.reuse and (cache_entry / STAGE_COMPLETE).is_file()
        )
        if cached:
            metrics = json.loads((cache_entry / STAGE_COMPLETE).read_text())
            metrics["compute/sft/reused"] = 1.0
            if distributed.is_rank_zero():
                print(f"Reusing the finished SFT stage from {cache_entry}")
            hand_over(cache_entry / "model", out_dir)
            return StageResult(out_dir, metrics, key)
        return _train_sft(ctx, stage, out_dir, stage_prefix, key)


def _publish(weights: Path, metrics: dict[str, float], cache_entry: Path) -> None:
    """The finished weights (hard links) and their metrics, written last, as one cache entry:
    a half-written entry is never taken as a result."""

    def build(staging: Path) -> None:
        shutil.copytree(weights, staging / "model", copy_function=link_or_copy)
        write_json_atomic(staging / STAGE_COMPLETE, metrics)

    build_directory_once(cache_entry, STAGE_COMPLETE, build)


def _train_sft(
    ctx: StageContext, stage: SFTSettings, out_dir: Path, stage_prefix: str, key: str
) -> StageResult:
    cfg, task = ctx.cfg, ctx.task
    work_dir = ctx.work_dir(f"sft-{key}")
    loaded, lineage = load_for_training(cfg.model, cfg.paths.cache_dir)
    tokenizer = loaded.tokenizer
    max_length = int(cfg.model.max_length)
    train_set, train_truncated = encode_split(task, tokenizer, ctx.splits["train"], max_length)
    val_set, val_truncated = encode_split(task, tokenizer, ctx.splits["val"], max_length)
    module = instantiate(dataclasses.asdict(stage.module), model=loaded.model)
    saver, callbacks = saver_and_callbacks(
        ctx,
        stage.save,
        stage.train,
        tokenizer,
        work_dir,
        info={**lineage, "model": cfg.model.name, "task": task.name, "method": "sft"}
        | {"stage_key": key},
    )
    result = fit(
        ctx,
        "sft",
        stage.train,
        module,
        (train_set, val_set),
        partial(collate_sft, pad_token_id=tokenizer.pad_token_id),
        saver,
        work_dir,
        stage_prefix,
        callbacks,
    )
    metrics = stage_compute(
        "sft",
        result.seconds,
        module,
        loaded.model,
        result.trainer.global_step,
        tokens_per_second=result.tokens_per_second,
    )
    metrics.update(
        {
            "compute/sft/reused": 0.0,
            "compute/sft/resumed": float(result.resumed),
            "data/train_examples": float(len(train_set)),
            "data/train_truncated": float(train_truncated),
            "data/val_examples": float(len(val_set)),
            "data/val_truncated": float(val_truncated),
            best_key("sft", saver): saver.best_or_nan,
        }
    )
    if distributed.is_rank_zero():
        _publish(work_dir / "model", metrics, sft_cache_entry(ctx, key))
    hand_over(work_dir / "model", out_dir, drop=work_dir)
    del module, loaded
    return StageResult(out_dir, metrics, key)
