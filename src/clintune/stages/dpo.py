"""The preference stage of DPO, RPO, ORPO, SimPO and KTO: preference pairs (from the data,
wrong labels or on-policy samples) or, for KTO, unpaired examples with their mismatched
completions; the reference log-probs where the method has a reference (precomputed and
cached, the adapter switched off, or a frozen copy); then the method's loss from the
starting weights. One code path: the methods differ in their module and their items."""

from __future__ import annotations

import copy
import dataclasses
import gc
import time
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
from clintune.methods.preferences import (
    FeedbackError,
    PreferencePair,
    answer_shift,
    build_pairs,
    mismatched_completions,
    split_by_feedback,
    unpaired_counts,
    unpaired_from_pairs,
)
from clintune.models.loading import (
    load_for_training,
    read_checkpoint_manifest,
    uses_gradient_checkpointing,
)
from clintune.settings import KTOSettings, PreferenceSettings
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
    """A preference stage's start given as ``method.init_from``: keyed by its path and
    manifest."""
    manifest = read_checkpoint_manifest(weights)
    return StageResult(weights, {}, content_hash([str(weights.resolve()), manifest], 64))


def _sampler(model: Any, tokenizer: Any, ctx: StageContext, method: PreferenceSettings) -> Any:
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
    items: list[tuple[Any, ...]], pad_token_id: int, share_prompt: bool
) -> dict[str, torch.Tensor]:
    """Items are (pair, reference chosen log-prob, reference rejected log-prob), and for KTO
    whether the example is desirable (its "rejected" row is the mismatched completion)."""
    batch = pair_collate(share_prompt)([item[0] for item in items], pad_token_id)
    batch["ref_chosen_logps"] = torch.tensor([item[1] for item in items], dtype=torch.float32)
    batch["ref_rejected_logps"] = torch.tensor([item[2] for item in items], dtype=torch.float32)
    if len(items[0]) > 3:
        batch["desirable"] = torch.tensor([bool(item[3]) for item in items])
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


def _pairs_for(
    ctx: StageContext,
    method: PreferenceSettings,
    split: str,
    examples: list[dict[str, Any]],
    sampler: Any,
) -> tuple[list[PreferencePair], dict[str, float]]:
    pairs_cfg = method.pairs
    pairs, counts = build_pairs(
        ctx.task,
        examples,
        source=pairs_cfg.source,
        seed=pairs_cfg.seed,
        sampler=sampler,
        samples_per_example=pairs_cfg.samples_per_example,
        max_pairs_per_example=pairs_cfg.max_pairs_per_example,
    )
    if not pairs and examples:
        raise UserError(
            f"no preference pairs for the {split} split of task '{ctx.task.name}' from "
            f"source '{pairs_cfg.source}' ({counts}); give a 'rejected' field or use on_policy"
        )
    return pairs, {**counts, **answer_shift(ctx.task, examples, pairs)}


def _unpaired_for(
    ctx: StageContext, method: KTOSettings, split: str, sampler: Any
) -> tuple[list[PreferencePair], list[bool], dict[str, float]]:
    """KTO's unpaired examples of a split, each as a pair (its completion, a mismatched
    completion), with its desirability in ``desirable`` order; and the counts."""
    try:
        own, rest = split_by_feedback(
            ctx.task,
            ctx.splits[split],
            source=method.unpaired.source,
            label_field=method.unpaired.label_field,
        )
    except FeedbackError as error:
        raise UserError(f"task '{ctx.task.name}', {split} split: {error}") from error
    counts: dict[str, float] = {}
    derived = []
    if rest:
        pairs, counts = _pairs_for(ctx, method, split, rest, sampler)
        derived = unpaired_from_pairs(pairs)
    unpaired = own + derived
    counts.update(unpaired_counts(unpaired))
    try:
        mismatched = mismatched_completions(unpaired, method.pairs.seed)
    except ValueError as error:
        raise UserError(f"task '{ctx.task.name}', {split} split: {error}") from error
    items = [
        PreferencePair(u.example_id, u.messages, u.completion, other, u.source)
        for u, other in zip(unpaired, mismatched, strict=True)
    ]
    for side in ("desirable", "undesirable"):  # recorded even when none
        counts.setdefault(f"unpaired/{side}", 0)
    return items, [u.desirable for u in unpaired], counts


def _build_encoded(
    ctx: StageContext, method: PreferenceSettings, policy: Any, tokenizer: Any
) -> tuple[dict[str, list[EncodedPair]], dict[str, list[bool]], dict[str, float], int]:
    """Encoded pairs per split (for KTO: each example with its mismatched completion), KTO's
    desirable flags per split (empty otherwise), the counts by source, and how many were
    truncated."""
    needs_sampler = method.pairs.source in ("on_policy", "auto")
    sampler = _sampler(policy, tokenizer, ctx, method) if needs_sampler else None
    counts_by_split: dict[str, float] = {}
    encoded: dict[str, list[EncodedPair]] = {}
    desirable: dict[str, list[bool]] = {}
    truncated = 0
    for split in ("train", "val"):
        if isinstance(method, KTOSettings):
            pairs, desirable[split], counts = _unpaired_for(ctx, method, split, sampler)
        else:
            pairs, counts = _pairs_for(ctx, method, split, ctx.splits[split], sampler)
        counts_by_split.update({f"{key}/{split}": float(v) for key, v in counts.items()})
        encoded[split], cut = _encode_pairs(pairs, tokenizer, int(ctx.cfg.model.max_length))
        truncated += cut
    return encoded, desirable, counts_by_split, truncated


def run_preference_stage(
    ctx: StageContext, method: PreferenceSettings, init: StageResult | None, out_dir: Path
) -> StageResult:
    """The method's preference stage from ``init`` (or the base model); its weights end up in
    ``out_dir``. Its figures are keyed by the method's kind: ``compute/dpo/…`` (DPO, RPO),
    ``compute/orpo/…``, ``compute/simpo/…``, ``compute/kto/…``."""
    cfg, stage = ctx.cfg, method.kind
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
    started = time.perf_counter()
    encoded, desirable, pair_counts, truncated = _build_encoded(ctx, method, policy, tokenizer)
    pair_seconds = time.perf_counter() - started
    reference = method.reference_mode
    reference_model = None
    if reference == "copy":
        if hasattr(policy, "peft_config"):
            raise UserError(
                "method.reference=copy with model.lora.enabled=true would copy the whole model "
                "for nothing: use method.reference=adapter_disabled (or precompute)"
            )
        reference_model = copy.deepcopy(policy)
    reference_tokens = 0
    items: dict[str, list[Any]] = {}
    cache_hits = 0
    started = time.perf_counter()
    for split in ("train", "val"):
        if reference == "precompute":
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
            columns = [encoded[split], chosen.tolist(), rejected.tolist()]
        else:  # computed during training, or a reference-free method
            columns = [encoded[split], [0.0] * len(encoded[split]), [0.0] * len(encoded[split])]
        if desirable:
            columns.append(desirable[split])
        items[split] = list(zip(*columns, strict=True))
    reference_seconds = time.perf_counter() - started
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
            **({"desirable": desirable} if desirable else {}),
            "trainer": container(cfg.trainer),
            "seed": ctx.settings.seed,
        }
    )
    work_dir = ctx.work_dir(f"{stage}-{key}")
    references = {"reference": reference, "reference_model": reference_model} if reference else {}
    module = instantiate(dataclasses.asdict(method.module), model=policy, **references)
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
            stage,
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
    # A reference-free method has none: its reference_tokens stay 0.
    reference_tokens += sum(distributed.gather_to_all(module.reference_tokens))
    # The stage's cost includes building its pairs (on-policy sampling) and the reference
    # precompute: both are compute that SFT alone does not spend.
    metrics = stage_compute(
        stage,
        result.seconds + pair_seconds + reference_seconds,
        module,
        policy,
        result.trainer.global_step,
        reference_tokens=reference_tokens,
        tokens_per_second=result.tokens_per_second,
    )
    metrics.update(pair_counts)
    metrics[f"compute/{stage}/resumed"] = float(result.resumed)
    metrics[f"compute/{stage}/reference_cache_hits"] = float(cache_hits)
    metrics[f"compute/{stage}/pair_seconds"] = pair_seconds
    metrics[f"compute/{stage}/reference_seconds"] = reference_seconds
    metrics[f"compute/{stage}/shared_prompt"] = float(share_prompt)
    metrics["data/pairs_truncated"] = float(truncated)
    metrics[best_key(stage, saver)] = saver.best_or_nan
    return StageResult(out_dir, metrics, "")


#: the name callers used when DPO was the only preference method
run_dpo_stage = run_preference_stage
