"""Batched greedy generation (left padding, length sorting, KV cache, stopping) against plain
one-prompt-at-a-time ``model.generate``, on both tiny chat formats; and the evaluation's test
set sharded over two gloo processes against one process. Every reported metric is computed
from these outputs."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import REPO, compose_train
from hydra.utils import instantiate

from clintune import distributed
from clintune.eval.generation import generate_greedy, stop_token_ids
from clintune.tokenization import encode_prompt

MAX_NEW_TOKENS = 12
# Very different lengths, deliberately not in length order, so that a batch mixes a 5-token
# prompt with a 300-token one (left padding matters) and the sort by length must be undone.
PROMPT_LENGTHS = (5, 300, 40, 12, 150, 5)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: these small matrices gain nothing from more, and on a busy
    machine the threads of a step wait on each other (several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _prompts(tokenizer: Any) -> list[list[int]]:
    """Prompts of PROMPT_LENGTHS tokens cut from different places of real clinical notes."""
    notes = [json.loads(line)["text"] for line in (REPO / "data/summarization/test.jsonl").open()]
    stream = tokenizer(" ".join(notes[:40]), add_special_tokens=False)["input_ids"]
    prompts = [stream[offset * 37 : offset * 37 + n] for offset, n in enumerate(PROMPT_LENGTHS)]
    assert [len(p) for p in prompts] == list(PROMPT_LENGTHS)
    assert prompts[0] != prompts[-1]
    return prompts


@torch.inference_mode()
def _one_at_a_time(model: Any, tokenizer: Any, prompts: list[list[int]]) -> list[list[int]]:
    """Plain HF greedy generation of each prompt alone (no padding at all); the new tokens up
    to the first stop token, which the project's decoding also cuts at."""
    stops = stop_token_ids(tokenizer, model)
    completions = []
    for prompt in prompts:
        input_ids = torch.tensor([prompt])
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            num_beams=1,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = generated[0, len(prompt) :].tolist()
        cut = next((k for k, token in enumerate(new) if token in stops), len(new))
        completions.append(new[:cut])
    return completions


def _text(tokenizer: Any, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_mistral"])
def test_batched_greedy_equals_one_prompt_at_a_time(
    model_name: str, tiny_models: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = tiny_models[model_name]
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = _prompts(tokenizer)
    was_training = model.training

    # The random tiny model does not say end-of-turn within a few tokens. Declare as a stop
    # token one it emits mid-answer for some prompts, so that rows of one batch stop at
    # different steps and the others keep going (stop_token_ids reads the model's config).
    free_running = _one_at_a_time(model, tokenizer, prompts)
    candidates = [
        token
        for completion in free_running
        for token in completion[3:-2]
        if sum(token in c for c in free_running) < len(prompts)
    ]
    assert candidates, free_running
    eos = model.generation_config.eos_token_id
    configured = [eos] if isinstance(eos, int) else list(eos or [])
    monkeypatch.setattr(model.generation_config, "eos_token_id", [*configured, candidates[0]])

    expected = _one_at_a_time(model, tokenizer, prompts)
    # The comparison means something: several answers are several tokens long, some were cut
    # by the stop token and some ran to max_new_tokens.
    lengths = [len(tokens) for tokens in expected]
    assert sum(n >= 3 for n in lengths) >= 3, lengths
    assert any(n < MAX_NEW_TOKENS for n in lengths) and MAX_NEW_TOKENS in lengths, lengths
    expected_texts = [_text(tokenizer, tokens) for tokens in expected]
    assert len(set(expected_texts)) >= 3, expected_texts

    for batch_size in (len(prompts), 2):  # one batch of all lengths; then sorted batches
        outputs = generate_greedy(
            model,
            tokenizer,
            prompts,
            max_new_tokens=MAX_NEW_TOKENS,
            batch_size=batch_size,
            show_progress=False,
        )
        assert outputs == expected_texts, (batch_size, outputs, expected_texts)
    assert model.training == was_training  # generation put the model back as it found it


# --------------------------------------------------------------------------- two processes


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _sharded_outputs(model: Any, tokenizer: Any, prompts: list[list[int]]) -> list[str]:
    """What the pipeline's evaluation does with the test set: each rank generates for its
    shard (``my_shard``), and the shards are gathered in rank order (``gather_to_all``)."""
    outputs = generate_greedy(
        model,
        tokenizer,
        distributed.my_shard(prompts),
        max_new_tokens=MAX_NEW_TOKENS,
        batch_size=2,
        show_progress=False,
    )
    return [output for shard in distributed.gather_to_all(outputs) for output in shard]


def _rank(
    rank: int,
    world_size: int,
    port: int,
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    out: str,
) -> None:
    torch.set_num_threads(1)  # two ranks share the machine's cores
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        outputs = _sharded_outputs(model, tokenizer, prompts)
        Path(out, f"rank{rank}.json").write_text(json.dumps(outputs))
    finally:
        dist.destroy_process_group()


def test_two_process_sharded_generation_gives_the_one_process_outputs(
    tiny_models: dict[str, Any], cache_dir: Path, tmp_path: Path
) -> None:
    cfg = compose_train(["model=tiny_llama", "task=triage"], cache_dir)
    task = instantiate(cfg.task, _convert_="partial")
    loaded = tiny_models["tiny_llama"]
    model = loaded.model
    examples = task.load_split("test")[:5]  # odd: the shards hold 3 and 2 examples
    # The untrained model answers prompts that end alike (the chat template's assistant
    # header) alike; a different last token per prompt makes a change of order show.
    prompts = [
        [*encode_prompt(loaded.tokenizer, task.messages(example)), 100 + 97 * i]
        for i, example in enumerate(examples)
    ]
    single = _sharded_outputs(model, loaded.tokenizer, prompts)
    assert single == generate_greedy(
        model, loaded.tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, show_progress=False
    )
    assert len(set(single)) >= 3, single  # a change of order would show

    # Forked ranks inherit the loaded model and the imports (spawned ones would spend most of
    # the test importing torch and transformers again); each forms its own gloo group.
    args = (2, _free_port(), model, loaded.tokenizer, prompts, str(tmp_path))
    mp.start_processes(_rank, args=args, nprocs=2, join=True, start_method="fork")
    for rank in (0, 1):  # every rank holds all outputs, in the test set's order
        outputs = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert outputs == single, (rank, outputs, single)
