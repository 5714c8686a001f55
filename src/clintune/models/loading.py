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


def load_model(
    model_cfg: DictConfig,
    cache_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    trainable_lora: bool = False,
) -> LoadedModel:
    """Load the model described by ``model_cfg``.

    ``checkpoint`` is a directory written by :func:`save_trained`: full weights are loaded
    from it directly, an adapter is put on top of the base model. ``trainable_lora`` wraps a
    fresh LoRA adapter around the base model when ``model.lora.enabled`` is set.
    """
    from transformers import AutoModelForCausalLM

    dtype = _dtype(model_cfg.get("dtype"))
    source = resolve_source(model_cfg, cache_dir)
    manifest = read_checkpoint_manifest(checkpoint) if checkpoint is not None else None
    if manifest is not None and manifest["kind"] == "full":
        weights_dir = str(checkpoint)
        tokenizer = load_tokenizer(weights_dir)
    else:
        weights_dir = source
        tokenizer = load_tokenizer(source)
    model = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=dtype)
    is_lora = False
    if manifest is not None and manifest["kind"] == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(checkpoint), is_trainable=trainable_lora)
        is_lora = True
    elif trainable_lora and model_cfg.lora.enabled:
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(model_cfg.lora))
        is_lora = True
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, is_lora=is_lora)


def save_trained(model: Any, tokenizer: Any, out_dir: str | Path, info: dict[str, Any]) -> None:
    """Save weights (or only the adapter, for a LoRA model) so that a crash never leaves a
    directory that looks complete: write beside, then swap in with renames; the manifest that
    marks completeness is written last inside the staging directory."""
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".tmp")
    previous = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(staging, ignore_errors=True)
    is_lora = hasattr(model, "peft_config")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
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
