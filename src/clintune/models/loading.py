"""Load a causal LM and its tokenizer from a hub id, a local directory, the tiny builder or a
clintune checkpoint (full weights or a LoRA adapter), always through ``from_pretrained``."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from clintune.models.tiny import TinyModelSpec, ensure_tiny_model

CHECKPOINT_MANIFEST = "clintune_checkpoint.json"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: str  # the directory or hub id the base weights came from
    is_lora: bool


def resolve_source(model_cfg: DictConfig, cache_dir: str | Path) -> str:
    """Hub id or local path of the base model; builds the tiny model on first use."""
    if model_cfg.get("tiny"):
        spec = TinyModelSpec(**OmegaConf.to_container(model_cfg.tiny, resolve=True))
        return str(ensure_tiny_model(spec, Path(cache_dir) / "models"))
    if not model_cfg.get("pretrained"):
        raise ValueError(f"model '{model_cfg.name}' sets neither model.pretrained nor model.tiny")
    return str(model_cfg.pretrained)


def _dtype(name: str | None) -> torch.dtype:
    if name is None:
        return torch.float32
    if name not in _DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        # Llama 3 and Mistral ship without a pad token; padding is masked, so any id works.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.chat_template is None:
        raise ValueError(
            f"The tokenizer at {source} defines no chat template; clintune formats prompts "
            "with the model's own template, so use an instruct model or add one."
        )
    return tokenizer


def _lora_config(lora_cfg: DictConfig) -> Any:
    from peft import LoraConfig, TaskType

    target = lora_cfg.target_modules
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=int(lora_cfg.r),
        lora_alpha=int(lora_cfg.alpha),
        lora_dropout=float(lora_cfg.dropout),
        target_modules=target if isinstance(target, str) else list(target),
    )


def read_checkpoint_manifest(checkpoint: str | Path) -> dict[str, Any]:
    manifest_path = Path(checkpoint) / CHECKPOINT_MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{checkpoint} is not a clintune checkpoint: {CHECKPOINT_MANIFEST} is missing "
            "(it is written last, so its absence also means an interrupted save)."
        )
    return json.loads(manifest_path.read_text())


def _base_for_checkpoint(
    model_cfg: DictConfig,
    source: str,
    manifest: dict[str, Any],
    checkpoint: Path,
    dtype: torch.dtype,
) -> Any:
    """The weights an adapter checkpoint sits on: the base model, or full fine-tuned weights
    (``base_weights``), with an earlier adapter merged in (``merged_adapter``, stored inside
    the checkpoint) when DPO-with-LoRA started from an SFT adapter."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(manifest.get("base_weights") or source, dtype=dtype)
    if manifest.get("merged_adapter"):
        from peft import PeftModel

        inner = checkpoint / manifest["merged_adapter"]
        inner_manifest = read_checkpoint_manifest(inner)
        if inner_manifest.get("base_weights") or inner_manifest.get("merged_adapter"):
            base = _base_for_checkpoint(model_cfg, source, inner_manifest, inner, dtype)
        base = PeftModel.from_pretrained(base, str(inner)).merge_and_unload()
    return base


def load_model(
    model_cfg: DictConfig,
    cache_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    trainable_lora: bool = False,
) -> LoadedModel:
    """Load the model described by ``model_cfg``.

    ``checkpoint`` is a directory written by :func:`save_trained`: full weights are loaded
    from it directly, an adapter is put on top of the weights it was trained on.
    ``trainable_lora`` wraps a fresh LoRA adapter around the base model when
    ``model.lora.enabled`` is set.
    """
    from transformers import AutoModelForCausalLM

    dtype = _dtype(model_cfg.get("dtype"))
    source = resolve_source(model_cfg, cache_dir)
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        manifest = read_checkpoint_manifest(checkpoint)
        tokenizer = load_tokenizer(str(checkpoint))
        if manifest["kind"] == "full":
            model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=dtype)
            return LoadedModel(model=model, tokenizer=tokenizer, source=source, is_lora=False)
        from peft import PeftModel

        base = _base_for_checkpoint(model_cfg, source, manifest, checkpoint, dtype)
        model = PeftModel.from_pretrained(base, str(checkpoint), is_trainable=trainable_lora)
        return LoadedModel(model=model, tokenizer=tokenizer, source=source, is_lora=True)
    tokenizer = load_tokenizer(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    is_lora = False
    if trainable_lora and model_cfg.lora.enabled:
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(model_cfg.lora))
        is_lora = True
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, is_lora=is_lora)


def load_for_training(
    model_cfg: DictConfig, cache_dir: str | Path, init: str | Path | None = None
) -> tuple[LoadedModel, dict[str, Any]]:
    """A model to train from ``init`` (None: the base model), and the lineage to record in
    the manifest of what it saves.

    From full weights, training continues on them (with a fresh adapter under LoRA, whose
    base is then those weights). From an adapter, the adapter is merged into its base first,
    so that under LoRA the new adapter's "disabled" state is the init model itself (the DPO
    reference), and the merged adapter is stored inside the new checkpoint.
    """
    source = resolve_source(model_cfg, cache_dir)
    lineage: dict[str, Any] = {"base_model": source}
    if init is None:
        loaded = load_model(model_cfg, cache_dir, trainable_lora=True)
        enable_memory_savers(loaded.model, model_cfg)
        return loaded, lineage
    init = Path(init)
    manifest = read_checkpoint_manifest(init)
    loaded = load_model(model_cfg, cache_dir, checkpoint=init)
    model = loaded.model
    lineage["init_from"] = str(init)
    if manifest["kind"] == "lora":
        model = model.merge_and_unload()
        if model_cfg.lora.enabled:
            lineage["merged_adapter"] = "init_adapter"
            if manifest.get("base_weights"):
                lineage["base_weights"] = manifest["base_weights"]
    elif model_cfg.lora.enabled:
        lineage["base_weights"] = str(init)
    is_lora = False
    if model_cfg.lora.enabled:
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(model_cfg.lora))
        is_lora = True
    model.train()
    enable_memory_savers(model, model_cfg)
    return LoadedModel(model, loaded.tokenizer, source, is_lora), lineage


def enable_memory_savers(model: Any, model_cfg: DictConfig) -> None:
    """Gradient checkpointing when ``model.gradient_checkpointing`` is set: non-reentrant, so
    that it composes with LoRA (frozen inputs) and with DDP."""
    if model_cfg.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False


def uses_gradient_checkpointing(model: Any) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(inner, "is_gradient_checkpointing", False))


def save_trained(
    model: Any,
    tokenizer: Any,
    out_dir: str | Path,
    info: dict[str, Any],
    extra_dirs: dict[str, Path] | None = None,
) -> None:
    """Save weights (or only the adapter, for a LoRA model) so that a crash never leaves a
    directory that looks complete: write beside, then swap in with renames; the manifest that
    marks completeness is written last inside the staging directory. ``extra_dirs`` are
    copied in (an adapter this one was stacked on)."""
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".tmp")
    previous = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(staging, ignore_errors=True)
    is_lora = hasattr(model, "peft_config")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    for name, directory in (extra_dirs or {}).items():
        shutil.copytree(directory, staging / name)
    manifest = {"kind": "lora" if is_lora else "full", **info}
    (staging / CHECKPOINT_MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    shutil.rmtree(previous, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, previous)
    os.replace(staging, out_dir)
    shutil.rmtree(previous, ignore_errors=True)


def count_parameters(model: Any) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
