"""Load a causal LM and its tokenizer from a hub id, a local directory, the tiny builder or a
clintune checkpoint (full weights or a LoRA adapter), always through ``from_pretrained``.

``model.quantization=4bit`` is QLoRA: the base weights are loaded frozen in 4-bit NF4 through
bitsandbytes and only LoRA adapters train. An adapter is never merged into 4-bit weights
(requantizing would round away most of its small update): where lineage needs a merge (DPO
from an SFT adapter), it is done once in ``model.dtype`` under ``<cache>/merged`` and that is
what gets quantized."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from packaging.version import Version

from clintune import distributed
from clintune.errors import UserError
from clintune.io import build_directory_once, content_hash, file_sha256
from clintune.models.architecture import check_architecture
from clintune.models.tiny import TinyModelSpec, ensure_tiny_model

CHECKPOINT_MANIFEST = "clintune_checkpoint.json"
MERGED_MARKER = "clintune_merged.json"

QUANTIZATION_CHOICES = ("4bit",)
# The oldest bitsandbytes that transformers 5 loads 4-bit weights with.
BITSANDBYTES_MIN_VERSION = "0.46.1"
QLORA_INSTALL = 'pip install -e ".[qlora]"'

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
        with distributed.rank_zero_first():
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


def installed_bitsandbytes() -> str | None:
    """The installed bitsandbytes version, None when it is not installed."""
    try:
        return importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_quantization(
    model_cfg: Mapping[str, Any] | DictConfig,
    cuda_available: bool,
    bitsandbytes_version: str | None = "installed",
) -> str | None:
    """``model.quantization`` (None or "4bit") if this machine and config can honour it, else
    a :class:`UserError` that says what to change. Pure apart from looking up the installed
    bitsandbytes when ``bitsandbytes_version`` is left at "installed"."""
    quantization = model_cfg.get("quantization")
    if quantization is None:
        return None
    if quantization not in QUANTIZATION_CHOICES:
        allowed = ", ".join(["null", *QUANTIZATION_CHOICES])
        raise UserError(f"model.quantization must be one of {allowed}; got {quantization!r}")
    lora = model_cfg.get("lora") or {}
    if not lora.get("enabled"):
        raise UserError(
            f"model.quantization={quantization}: QLoRA trains LoRA adapters on a frozen 4-bit "
            "base: set model.lora.enabled=true"
        )
    if not cuda_available:
        raise UserError(
            f"model.quantization={quantization}: bitsandbytes 4-bit needs a CUDA GPU; run with "
            "trainer=gpu on a GPU machine (or set model.quantization=null)"
        )
    if bitsandbytes_version == "installed":
        bitsandbytes_version = installed_bitsandbytes()
    if bitsandbytes_version is None:
        raise UserError(
            f"model.quantization={quantization} needs bitsandbytes, which is not installed: "
            f"{QLORA_INSTALL}"
        )
    if Version(bitsandbytes_version) < Version(BITSANDBYTES_MIN_VERSION):
        raise UserError(
            f"model.quantization={quantization} needs bitsandbytes>={BITSANDBYTES_MIN_VERSION}, "
            f"found {bitsandbytes_version}: {QLORA_INSTALL}"
        )
    return str(quantization)


def _quantized(model_cfg: DictConfig) -> bool:
    return check_quantization(model_cfg, torch.cuda.is_available()) == "4bit"


def _compute_dtype(model_cfg: DictConfig) -> torch.dtype:
    """4-bit layers compute in ``model.dtype``, bfloat16 when unset."""
    name = model_cfg.get("dtype")
    return torch.bfloat16 if name is None else _dtype(name)


def _attention(model_cfg: DictConfig) -> dict[str, str]:
    """``attn_implementation`` for ``from_pretrained`` when ``model.attn_implementation`` is
    set (eager, sdpa, flash_attention_2); transformers' own default otherwise."""
    implementation = model_cfg.get("attn_implementation")
    return {"attn_implementation": str(implementation)} if implementation else {}


def _from_pretrained(path: str | Path, model_cfg: DictConfig, *, quantize: bool) -> Any:
    from transformers import AutoModelForCausalLM

    if not quantize:
        return AutoModelForCausalLM.from_pretrained(
            str(path), dtype=_dtype(model_cfg.get("dtype")), **_attention(model_cfg)
        )
    from transformers import BitsAndBytesConfig

    dtype = _compute_dtype(model_cfg)
    quantization_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    return AutoModelForCausalLM.from_pretrained(
        str(path),
        dtype=dtype,  # the layers that stay unquantized (embeddings, norms, lm_head)
        quantization_config=quantization_config,
        # bitsandbytes quantizes as it places the weights: on this process's GPU (under DDP,
        # the one of its local rank); moving a 4-bit model later is supported, casting it is not.
        device_map={"": int(os.environ.get("LOCAL_RANK", "0"))},
        **_attention(model_cfg),
    )


def _prepare_for_kbit_training(model: Any, model_cfg: DictConfig) -> Any:
    """Freeze the 4-bit base and upcast its unquantized layers to float32 (peft's recipe),
    with non-reentrant gradient checkpointing when ``model.gradient_checkpointing`` is set."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=bool(model_cfg.get("gradient_checkpointing")),
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


class ModelNotAvailable(UserError, OSError):
    """A hub id that is neither reachable nor in the local Hugging Face cache."""


def load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:
        if Path(source).is_dir():
            raise
        # The tokenizer is the first file fetched: this is where a missing hub shows.
        raise ModelNotAvailable(
            f"model '{source}' is not on this machine and the Hugging Face hub cannot be "
            "reached (or the model is gated and this account has not accepted its licence). "
            "Download it where the hub is reachable (huggingface-cli download "
            f"{source}) and copy the cache (HF_HOME), set model.pretrained to a local "
            "directory, or use model=tiny_llama."
        ) from error
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
    *,
    quantize: bool = False,
    cache_dir: str | Path | None = None,
) -> Any:
    """The weights an adapter checkpoint sits on: the base model, or full fine-tuned weights
    (``base_weights``), with an earlier adapter merged in (``merged_adapter``, stored inside
    the checkpoint) when DPO-with-LoRA started from an SFT adapter. ``quantize``: the same
    weights in 4-bit, the merge done in full precision first (see :func:`merged_base_dir`)."""
    if quantize:
        if manifest.get("merged_adapter"):
            assert cache_dir is not None, "a 4-bit merged base needs the cache directory"
            path = merged_base_dir(model_cfg, checkpoint / manifest["merged_adapter"], cache_dir)
        else:
            path = Path(manifest.get("base_weights") or source)
        return _from_pretrained(path, model_cfg, quantize=True)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        manifest.get("base_weights") or source, dtype=dtype, **_attention(model_cfg)
    )
    if manifest.get("merged_adapter"):
        from peft import PeftModel

        inner = checkpoint / manifest["merged_adapter"]
        inner_manifest = read_checkpoint_manifest(inner)
        if inner_manifest.get("base_weights") or inner_manifest.get("merged_adapter"):
            base = _base_for_checkpoint(model_cfg, source, inner_manifest, inner, dtype)
        base = PeftModel.from_pretrained(base, str(inner)).merge_and_unload()
    return base


def _adapter_identity(checkpoint: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """What fixes base + this adapter: file contents, not paths, so the copy of an adapter
    stored inside a later checkpoint (``init_adapter``) names the same merged weights."""
    identity: dict[str, Any] = {
        "files": {
            p.name: file_sha256(p)
            for p in sorted(checkpoint.iterdir())
            if p.is_file() and p.name.startswith("adapter_")
        },
        "base_weights": manifest.get("base_weights"),
    }
    if manifest.get("merged_adapter"):
        inner = checkpoint / manifest["merged_adapter"]
        identity["merged_adapter"] = _adapter_identity(inner, read_checkpoint_manifest(inner))
    return identity


def merged_base_dir(model_cfg: DictConfig, checkpoint: str | Path, cache_dir: str | Path) -> Path:
    """Full weights of the adapter ``checkpoint`` merged into its base in ``model.dtype``
    (bfloat16 when unset), saved once under ``<cache_dir>/merged`` for a 4-bit load: the
    QLoRA way to start from an adapter without merging it into quantized weights. Safe under
    concurrency like the tiny-model cache: a lock, a private staging directory, one rename."""
    with distributed.rank_zero_first():
        return _merged_base_dir(model_cfg, checkpoint, cache_dir)


def _merged_base_dir(model_cfg: DictConfig, checkpoint: str | Path, cache_dir: str | Path) -> Path:
    checkpoint = Path(checkpoint)
    manifest = read_checkpoint_manifest(checkpoint)
    if manifest["kind"] != "lora":
        raise ValueError(f"{checkpoint} holds full weights, not an adapter to merge")
    source = resolve_source(model_cfg, cache_dir)
    dtype = _compute_dtype(model_cfg)
    identity = {
        "source": source,
        "dtype": str(dtype),
        "adapter": _adapter_identity(checkpoint, manifest),
    }
    key = content_hash(identity)

    def merge_into(staging: Path) -> None:
        from peft import PeftModel

        base = _base_for_checkpoint(model_cfg, source, manifest, checkpoint, dtype)
        merged = PeftModel.from_pretrained(base, str(checkpoint)).merge_and_unload()
        merged.save_pretrained(staging)
        (staging / MERGED_MARKER).write_text(json.dumps(identity, indent=2))

    return build_directory_once(Path(cache_dir) / "merged" / key, MERGED_MARKER, merge_into)


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
    ``model.lora.enabled`` is set. Under ``model.quantization=4bit`` the base (or full)
    weights are loaded in 4-bit on the GPU, and prepared for k-bit training when an adapter
    is to be trained.
    """
    quantize = _quantized(model_cfg)
    dtype = _dtype(model_cfg.get("dtype"))
    source = resolve_source(model_cfg, cache_dir)
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        manifest = read_checkpoint_manifest(checkpoint)
        tokenizer = load_tokenizer(str(checkpoint))
        if manifest["kind"] == "full":
            model = _from_pretrained(checkpoint, model_cfg, quantize=quantize)
            return LoadedModel(model=model, tokenizer=tokenizer, source=source, is_lora=False)
        from peft import PeftModel

        base = _base_for_checkpoint(
            model_cfg, source, manifest, checkpoint, dtype, quantize=quantize, cache_dir=cache_dir
        )
        if quantize and trainable_lora:
            base = _prepare_for_kbit_training(base, model_cfg)
        model = PeftModel.from_pretrained(base, str(checkpoint), is_trainable=trainable_lora)
        return LoadedModel(model=model, tokenizer=tokenizer, source=source, is_lora=True)
    tokenizer = load_tokenizer(source)
    model = _from_pretrained(source, model_cfg, quantize=quantize)
    architecture = model_cfg.get("architecture")
    if architecture:
        check_architecture(model.config, OmegaConf.to_container(architecture), source)
    is_lora = False
    if trainable_lora and model_cfg.lora.enabled:
        from peft import get_peft_model

        if quantize:
            model = _prepare_for_kbit_training(model, model_cfg)
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
    quantize = _quantized(model_cfg)  # before anything is built or loaded
    source = resolve_source(model_cfg, cache_dir)
    lineage: dict[str, Any] = {"base_model": source}
    if init is None:
        loaded = load_model(model_cfg, cache_dir, trainable_lora=True)
        enable_memory_savers(loaded.model, model_cfg)
        return loaded, lineage
    init = Path(init)
    manifest = read_checkpoint_manifest(init)
    if quantize and manifest["kind"] == "lora":
        # Not load + merge_and_unload: that would merge into 4-bit weights.
        tokenizer = load_tokenizer(str(init))
        merged = merged_base_dir(model_cfg, init, cache_dir)
        model = _from_pretrained(merged, model_cfg, quantize=True)
    else:
        loaded = load_model(model_cfg, cache_dir, checkpoint=init)
        model, tokenizer = loaded.model, loaded.tokenizer
        if manifest["kind"] == "lora":
            model = model.merge_and_unload()
    lineage["init_from"] = str(init)
    if manifest["kind"] == "lora":
        if model_cfg.lora.enabled:
            lineage["merged_adapter"] = "init_adapter"
            if manifest.get("base_weights"):
                lineage["base_weights"] = manifest["base_weights"]
    elif model_cfg.lora.enabled:
        lineage["base_weights"] = str(init)
    is_lora = False
    if model_cfg.lora.enabled:
        from peft import get_peft_model

        if quantize:
            model = _prepare_for_kbit_training(model, model_cfg)
        model = get_peft_model(model, _lora_config(model_cfg.lora))
        is_lora = True
    model.train()
    enable_memory_savers(model, model_cfg)
    return LoadedModel(model, tokenizer, source, is_lora), lineage


def enable_memory_savers(model: Any, model_cfg: DictConfig) -> None:
    """Gradient checkpointing when ``model.gradient_checkpointing`` is set: non-reentrant, so
    that it composes with LoRA (frozen inputs) and with DDP."""
    if model_cfg.get("gradient_checkpointing"):
        enable_gradient_checkpointing(model)


def enable_gradient_checkpointing(model: Any) -> None:
    """Each decoder layer recomputed in backward, non-reentrant: it composes with LoRA
    (frozen inputs), DDP and FSDP2 (whose hooks leave the recomputation's gathering to the
    backward pass). Layers that recompute keep no KV cache."""
    # transformers 5 renamed it; the old name warns and goes in v6.
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def uses_gradient_checkpointing(model: Any) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(inner, "is_activation_checkpointing", False))


@contextlib.contextmanager
def _no_transformers_progress_bar() -> Iterator[None]:
    """A save at every validation would draw a bar through Lightning's progress bar."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def save_trained(
    model: Any,
    tokenizer: Any,
    out_dir: str | Path,
    info: dict[str, Any],
    extra_dirs: dict[str, Path] | None = None,
    state_dict: dict[str, Any] | None = None,
) -> None:
    """Save weights (or only the adapter, for a LoRA model) so that a crash never leaves a
    directory that looks complete: write beside, then swap in with renames; the manifest that
    marks completeness is written last inside the staging directory. ``extra_dirs`` are
    copied in (an adapter this one was stacked on).

    Under QLoRA the model is a peft model on a 4-bit base, so only the adapter is saved; its
    base is re-created from the lineage in ``info`` when it is loaded, never merged here."""
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".tmp")
    previous = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(staging, ignore_errors=True)
    is_lora = hasattr(model, "peft_config")
    if not is_lora and getattr(model, "is_loaded_in_4bit", False):
        raise ValueError("4-bit weights are a frozen base: save a LoRA adapter trained on them")
    # state_dict: the full weights gathered from shards (FSDP); otherwise the model's own.
    with _no_transformers_progress_bar():
        model.save_pretrained(staging, state_dict=state_dict)
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


def _parameter_count(parameter: torch.nn.Parameter) -> int:
    if parameter.__class__.__name__ == "Params4bit":
        # bitsandbytes packs two 4-bit values per byte of storage (as peft counts them).
        return parameter.numel() * 2 * parameter.element_size()
    return parameter.numel()


def count_parameters(model: Any) -> tuple[int, int]:
    """(total, trainable) parameter counts; a 4-bit weight counts as its unpacked size."""
    total = sum(_parameter_count(p) for p in model.parameters())
    trainable = sum(_parameter_count(p) for p in model.parameters() if p.requires_grad)
    return total, trainable
