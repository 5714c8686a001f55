"""The embedded default models: tiny Llama/Mistral-architecture LMs built locally.

They are built once into a cache directory (tokenizer trained on the shipped demo text,
weights randomly initialised) and then loaded through ``from_pretrained`` exactly like a hub
model, so the default job exercises the same code path as ``model=llama3``.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clintune.io import build_directory_once, content_hash, file_sha256

BUILD_FORMAT_VERSION = 1
COMPLETE_MARKER = "clintune_build.json"

# Chat templates mirror the real models' formats, so prompt masking is exercised on both styles.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] | trim + '\n\n' }}"
    "{% endif %}{% endfor %}"
)

_STYLES: dict[str, dict[str, Any]] = {
    "llama": {
        "special_tokens": [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|pad|>",
        ],
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "pad": "<|pad|>",
        "chat_template": LLAMA3_CHAT_TEMPLATE,
    },
    "mistral": {
        "special_tokens": ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<pad>"],
        "bos": "<s>",
        "eos": "</s>",
        "pad": "<pad>",
        "unk": "<unk>",
        "chat_template": MISTRAL_CHAT_TEMPLATE,
    },
}


@dataclass(frozen=True)
class TinyModelSpec:
    """Everything that determines a tiny model's files; its hash names the cache entry."""

    arch: str  # "llama" or "mistral"
    vocab_size: int = 8000
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    init_seed: int = 0
    corpus: list[str] = field(default_factory=list)  # glob patterns of JSONL demo data

    def __post_init__(self) -> None:
        if self.arch not in _STYLES:
            raise ValueError(f"tiny model arch must be one of {sorted(_STYLES)}, got {self.arch!r}")


def _corpus_files(patterns: list[str]) -> list[Path]:
    files = sorted({Path(p) for pattern in patterns for p in glob.glob(pattern)})
    if not files:
        raise FileNotFoundError(
            f"The tiny model's tokenizer is trained on the demo data, but no file matches "
            f"{patterns}. Run `python data/generate.py` or set model.tiny.corpus."
        )
    return files


def _strings_in(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings_in(item)


def _corpus_texts(files: list[Path]) -> Iterator[str]:
    for path in files:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    yield from _strings_in(json.loads(line))


def cache_key(spec: TinyModelSpec) -> str:
    corpus = [(path.name, file_sha256(path)) for path in _corpus_files(spec.corpus)]
    payload = {"v": BUILD_FORMAT_VERSION, **asdict(spec), "corpus_files": corpus}
    return f"tiny_{spec.arch}-{content_hash(payload, 16)}"


def _train_tokenizer(spec: TinyModelSpec, files: list[Path]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    style = _STYLES[spec.arch]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=style["special_tokens"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    backend.train_from_iterator(_corpus_texts(files), trainer)
    special = {key: style[key] for key in ("unk",) if key in style}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=style["bos"],
        eos_token=style["eos"],
        pad_token=style["pad"],
        chat_template=style["chat_template"],
        model_max_length=spec.max_position_embeddings,
        padding_side="right",
        **{f"{key}_token": value for key, value in special.items()},
    )


def _build_model(spec: TinyModelSpec, tokenizer: Any) -> Any:
    import torch
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "max_position_embeddings": spec.max_position_embeddings,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    # Seeded for the same weights on every build, in a fork of the generators: a run that
    # builds the model must go on drawing what a run that finds it cached draws (a LoRA
    # adapter's initial weights, dropout), or the first run of a command differs from the rest.
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(spec.init_seed)
        if spec.arch == "llama":
            model = LlamaForCausalLM(LlamaConfig(**common))
        else:
            model = MistralForCausalLM(MistralConfig(sliding_window=None, **common))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


def ensure_tiny_model(spec: TinyModelSpec, cache_dir: str | Path) -> Path:
    """Return the directory of the built model, building it first if needed.

    Safe under concurrency: builders serialise on a file lock, build into a private temporary
    directory and publish it with one atomic rename, so a reader never sees a partial build
    and a killed builder leaves only a temporary directory that the next build ignores.
    """

    def build(staging: Path) -> None:
        files = _corpus_files(spec.corpus)
        tokenizer = _train_tokenizer(spec, files)
        model = _build_model(spec, tokenizer)
        tokenizer.save_pretrained(staging)
        model.save_pretrained(staging)
        manifest = {"spec": asdict(spec), "num_parameters": model.num_parameters()}
        (staging / COMPLETE_MARKER).write_text(json.dumps(manifest, indent=2))

    return build_directory_once(Path(cache_dir) / cache_key(spec), COMPLETE_MARKER, build)
