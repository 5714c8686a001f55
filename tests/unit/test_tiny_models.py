"""The embedded default models are real: built once, loaded through from_pretrained, and the
cache survives concurrent builders and killed ones."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
from helpers import REPO

from clintune.models.tiny import COMPLETE_MARKER, TinyModelSpec, cache_key, ensure_tiny_model

# A small corpus keeps these builds fast; the real corpus is exercised by the session fixture.
CORPUS = [str(REPO / "data" / "triage" / "val.jsonl")]


@pytest.mark.parametrize(
    ("name", "model_class", "tokenizer_class_word"),
    [
        ("tiny_llama", "LlamaForCausalLM", "llama"),
        ("tiny_mistral", "MistralForCausalLM", "mistral"),
    ],
)
def test_tiny_models_are_real_small_llms(
    tiny_models, name, model_class, tokenizer_class_word
) -> None:
    loaded = tiny_models[name]
    assert type(loaded.model).__name__ == model_class
    parameters = sum(p.numel() for p in loaded.model.parameters())
    assert 5_000_000 <= parameters <= 20_000_000
    tokenizer = loaded.tokenizer
    assert tokenizer.chat_template and tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    # Byte-level BPE: any text round-trips, including text never seen in training.
    text = "Pt c/o dysuria × 3 days; T 38.9 °C — ¿urgente? 🙂"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert Path(loaded.source, COMPLETE_MARKER).is_file()


def test_loaded_through_the_auto_classes(tiny_models) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tiny_models["tiny_llama"].source
    model = AutoModelForCausalLM.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token == "<|eot_id|>"


def _build(cache: str, queue: multiprocessing.Queue) -> None:
    path = ensure_tiny_model(TinyModelSpec(arch="mistral", vocab_size=600, corpus=CORPUS), cache)
    queue.put(str(path))


def test_concurrent_builders_produce_one_complete_model(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_build, args=(str(tmp_path), queue)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
        assert worker.exitcode == 0
    paths = {queue.get(timeout=5) for _ in workers}
    assert len(paths) == 1
    built = Path(paths.pop())
    assert json.loads((built / COMPLETE_MARKER).read_text())["spec"]["arch"] == "mistral"
    leftovers = [p.name for p in tmp_path.iterdir() if p.is_dir() and p != built]
    assert leftovers == []

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(built)


def test_an_interrupted_build_is_never_used(tmp_path: Path) -> None:
    spec = TinyModelSpec(arch="llama", vocab_size=600, corpus=CORPUS)
    # What a builder killed mid-way leaves: a half-filled final directory without the marker.
    half = tmp_path / cache_key(spec)
    half.mkdir()
    (half / "config.json").write_text("{ truncated")
    built = ensure_tiny_model(spec, tmp_path)
    assert built == half and (built / COMPLETE_MARKER).is_file()
    assert json.loads((built / "config.json").read_text())["model_type"] == "llama"


def test_cache_key_follows_spec_and_corpus(tmp_path: Path) -> None:
    corpus = tmp_path / "train.jsonl"
    corpus.write_text('{"id": "a", "text": "dysuria"}\n')
    spec = TinyModelSpec(arch="llama", corpus=[str(corpus)])
    first = cache_key(spec)
    assert cache_key(TinyModelSpec(arch="llama", corpus=[str(corpus)], hidden_size=128)) != first
    corpus.write_text('{"id": "a", "text": "hematuria"}\n')
    assert cache_key(spec) != first


def test_missing_corpus_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no file matches"):
        ensure_tiny_model(TinyModelSpec(arch="llama", corpus=[str(tmp_path / "*.jsonl")]), tmp_path)
