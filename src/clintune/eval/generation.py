"""Batched greedy generation: prompts sorted by length (less padding), left-padded so every
row's next token sits at the end, with the KV cache on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm


def stop_token_ids(tokenizer: Any, model: Any) -> list[int]:
    """End-of-turn ids: the tokenizer's eos, the model's configured eos ids, and the
    end-of-turn tokens of common chat formats (Llama 3 ends a turn with <|eot_id|>)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    for token in ("<|eot_id|>", "<|im_end|>", "<|end_of_text|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
            ids.add(token_id)
    return sorted(ids)


def left_pad(
    prompts: Sequence[list[int]], rows: list[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask for ``rows`` of ``prompts``, padded on the left so that
    every row's next token is generated at the same position."""
    length = max(len(prompts[i]) for i in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for row, index in enumerate(rows):
        ids = prompts[index]
        input_ids[row, length - len(ids) :] = torch.tensor(ids)
        attention_mask[row, length - len(ids) :] = 1
    return input_ids, attention_mask


def _decode_until_stop(tokenizer: Any, tokens: list[int], stops: list[int]) -> str:
    cut = next((k for k, token in enumerate(tokens) if token in stops), len(tokens))
    return tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip()


@torch.inference_mode()
def _generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    show_progress: bool,
    description: str,
    samples: int = 1,
    **decoding: Any,
) -> list[list[str]]:
    """``samples`` completions per prompt, in the input order; prompts are sorted by length
    so that batches hold similar lengths (less padding)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    stops = stop_token_ids(tokenizer, model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    outputs: list[list[str]] = [[] for _ in prompts]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    try:
        for batch in tqdm(batches, desc=description, unit="batch", disable=not show_progress):
            input_ids, attention_mask = left_pad(prompts, batch, pad_id)
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                num_return_sequences=samples,
                use_cache=True,
                eos_token_id=stops,
                pad_token_id=pad_id,
                **decoding,
            )
            new_tokens = generated[:, input_ids.size(1) :].tolist()
            for row, index in enumerate(batch):
                for k in range(samples):
                    tokens = new_tokens[row * samples + k]
                    outputs[index].append(_decode_until_stop(tokenizer, tokens, stops))
    finally:
        model.train(was_training)
    return outputs


def generate_greedy(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    show_progress: bool = True,
) -> list[str]:
    """Greedy completions of token-id prompts, returned in the input order."""
    outputs = _generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        show_progress=show_progress,
        description="evaluating",
        do_sample=False,
        num_beams=1,
    )
    return [texts[0] for texts in outputs]


def generate_sampled(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    *,
    samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    show_progress: bool = True,
) -> list[list[str]]:
    """``samples`` sampled completions per prompt (for on-policy preference pairs), seeded so
    that the same model and prompts give the same samples."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return _generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            show_progress=show_progress,
            description="sampling",
            samples=samples,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
        )
    finally:
        torch.random.set_rng_state(generator_state)
