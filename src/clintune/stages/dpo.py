"""The DPO stage: preference pairs (from the data, wrong labels or on-policy samples), the
reference log-probs (precomputed and cached, the adapter switched off, or a frozen copy),
then the DPO loss from the starting weights."""

from __future__ import annotations

import copy
import dataclasses
import gc
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from clintune import distributed
from clintune.compute import stage_compute
from clintune.errors import UserError
from clintune.eval.generation import generate_sampled
from clintune.io import atomic_open, content_hash
from clintune.methods.dpo import precompute_reference_logps
from clintune.methods.logprobs import DEFAULT_CHUNK_SIZE
from clintune.methods.preferences import build_pairs
from clintune.models.loading import (
    load_for_training,
    read_checkpoint_manifest,
    uses_gradient_checkpointing,
)
from clintune.settings import DPOSettings
from clintune.stages.common import (
    StageContext,
    StageResult,
    best_key,
    container,
    fit,
    hand_over,
    saver_and_callbacks,
    stage_lock,
    task_payload,
)
from clintune.tokenization import (
    EncodedPair,
    collate_pairs,
    collate_pairs_shared_prompt,
    encode_pair,
    encode_prompt,
)


def start_from_checkpoint(weights: Path) -> StageResult:
    """A DPO start given as ``method.init_from``: keyed by its path and manifest."""
    manifest = read_checkpoint_manifest(weights)
    return StageResult(weights, {}, content_hash([str(weights.resolve()), manifest], 64))


def _sampler(model: Any, tokenizer: Any, ctx: StageContext, method: DPOSettings) -> Any:
    task, eval_settings = ctx.task, ctx.settings.eval

    def sample(examples: list[dict[str, Any]], count: int) -> list[list[str]]:
        prompts = [encode_prompt(tokenizer, task.messages(e)) for e in examples]
        return generate_sampled(
            model,
            tokenizer,
            prompts,
            samples=count,
            max_new_tokens=task.max_new_tokens,
            temperature=method.pairs.temperature,
            batch_size=eval_settings.batch_size,
            seed=method.pairs.seed,
            show_progress=eval_settings.progress_bar,
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
    chunk_size: int = DEFAULT_CHUNK_SIZE,
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
    shards = distributed.gather_to_all(precompute_reference_logps(model, loader, chunk_size))
    chosen = torch.cat([shard[0] for shard in shards])
    rejected = torch.cat([shard[1] for shard in shards])
    tokens = sum(shard[2] for shard in shards)
    if distributed.is_rank_zero():
        with atomic_open(cache_file) as handle:
            torch.save({"chosen": chosen, "rejected": rejected}, handle)
    return chosen, rejected, tokens, False


def _build_encoded_pairs(
    ctx: StageContext, method: DPOSettings, policy: Any, tokenizer: Any
) -> tuple[dict[str, list[EncodedPair]], dict[str, float], int]:
    """Encoded pairs per split, the pair counts by source, and how many were truncated."""
    pairs_cfg = method.pairs
    needs_sampler = pairs_cfg.source in ("on_policy", "auto")
    sampler = _sampler(policy, tokenizer, ctx, method) if needs_sampler else None
    counts_by_split: dict[str, float] = {}
    encoded: dict[str, list[EncodedPair]] = {}
    truncated = 0
    for split in ("train", "val"):
        pairs, counts = build_pairs(
            ctx.task,
            ctx.splits[split],
            source=pairs_cfg.source,
            seed=pairs_cfg.seed,
            sampler=sampler,
            samples_per_example=pairs_cfg.samples_per_example,
            max_pairs_per_example=pairs_cfg.max_pairs_per_example,
        )
        if not pairs:
            raise UserError(
                f"no preference pairs for the {split} split of task '{ctx.task.name}' from "
                f"source '{pairs_cfg.source}' ({counts}); give a 'rejected' field or use on_policy"
            )
        counts_by_split.update({f"{key}/{split}": float(v) for key, v in counts.items()})
        encoded[split], cut = _encode_pairs(pairs, tokenizer, int(ctx.cfg.model.max_length))
        truncated += cut
    return encoded, counts_by_split, truncated


def run_dpo_stage(
    ctx: StageContext, method: DPOSettings, init: StageResult | None, out_dir: Path
) -> StageResult:
    """DPO from ``init`` (or the base model); its weights end up in ``out_dir``."""
    cfg = ctx.cfg
    gc.collect()
    init_weights = init.weights if init is not None else None
    loaded, lineage = load_for_training(cfg.model, cfg.paths.cache_dir, init_weights)
    # Sampling and the reference pass run before fit: on the device training will use.
    policy, tokenizer = loaded.model.to(distributed.device_for(cfg.trainer)), loaded.tokenizer
    pad_id = tokenizer.pad_token_id
    # Checkpointed layers keep no KV cache, which the shared-prompt pass needs (FSDP's
    # activation checkpointing is switched on later, when the model is sharded).
    sharding = ctx.settings.trainer.sharding
    checkpointed = uses_gradient_checkpointing(policy) or bool(
        sharding and sharding.activation_checkpointing
    )
    share_prompt = method.share_prompt and not checkpointed
    encoded, pair_counts, truncated = _build_encoded_pairs(ctx, method, policy, tokenizer)
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
            reference_key = content_hash(
                {
                    "weights": init.key if init is not None else container(cfg.model),
                    "share_prompt": share_prompt,
                    "pairs": [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in encoded[split]],
                },
                24,
            )
            chosen, rejected, tokens, hit = reference_logps_cached(
                policy,
                encoded[split],
                pad_token_id=pad_id,
                batch_size=method.train.eval_batch_size,
                cache_file=ctx.cache_dir / "reference" / f"{reference_key}.pt",
                share_prompt=share_prompt,
                chunk_size=method.module.logits_chunk_size,
            )
            reference_tokens += tokens if split == "train" else 0
            cache_hits += int(hit)
            items[split] = list(
                zip(encoded[split], chosen.tolist(), rejected.tolist(), strict=True)
            )
        else:
            items[split] = [(pair, 0.0, 0.0) for pair in encoded[split]]
    key = content_hash(
        {
            "init": init.key if init is not None else None,
            "model": container(cfg.model),
            "task": task_payload(cfg),
            "method": dataclasses.asdict(method),
            "pairs": {
                split: content_hash([dataclasses.astuple(p) for p in encoded[split]], 64)
                for split in encoded
            },
            "trainer": container(cfg.trainer),
            "seed": ctx.settings.seed,
        }
    )
    work_dir = ctx.work_dir(f"dpo-{key}")
    module = instantiate(
        dataclasses.asdict(method.module),
        model=policy,
        reference=method.reference,
        reference_model=reference_model,
    )
    extra_dirs = {}
    if lineage.get("merged_adapter") and init_weights is not None:
        extra_dirs[lineage["merged_adapter"]] = init_weights
    saver, callbacks = saver_and_callbacks(
        ctx,
        method.save,
        method.train,
        tokenizer,
        work_dir,
        info={**lineage, "model": cfg.model.name, "task": ctx.task.name, "method": method.name},
        extra_dirs=extra_dirs,
    )
    collate = partial(collate_with_reference, pad_token_id=pad_id, share_prompt=share_prompt)
    with stage_lock(work_dir):
        result = fit(
            ctx,
            "dpo",
            method.train,
            module,
            (items["train"], items["val"]),
            collate,
            saver,
            work_dir,
            "",
            callbacks,
        )
        hand_over(work_dir / "model", out_dir, drop=work_dir)
    reference_tokens += sum(distributed.gather_to_all(module.reference_tokens))
    metrics = stage_compute(
        "dpo",
        result.seconds,
        module,
        policy,
        result.trainer.global_step,
        reference_tokens=reference_tokens,
        tokens_per_second=result.tokens_per_second,
    )
    metrics.update(pair_counts)
    metrics["compute/dpo/resumed"] = float(result.resumed)
    metrics["compute/dpo/reference_cache_hits"] = float(cache_hits)
    metrics["compute/dpo/shared_prompt"] = float(share_prompt)
    metrics["data/pairs_truncated"] = float(truncated)
    metrics[best_key("dpo", saver)] = saver.best_or_nan
    return StageResult(out_dir, metrics, "")
