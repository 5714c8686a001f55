"""Prompt/completion encoding shared by training and evaluation.

The prompt is the chat template with the generation prompt added; the completion is the rest
of the templated conversation (the answer and the end-of-turn token). Training conditions on
exactly the ids that generation later feeds the model, so the two can never drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100


@dataclass
class EncodedExample:
    prompt_ids: list[int]
    completion_ids: list[int]
    truncated: bool = False


def prompt_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def completion_text(tokenizer: Any, messages: list[dict[str, str]], answer: str) -> str:
    """The template's rendering of the assistant turn, i.e. what follows the prompt."""
    prompt = prompt_text(tokenizer, messages)
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": answer}], tokenize=False
    )
    if not full.startswith(prompt):
        # Some templates render a turn differently once it is followed by another; fall back
        # to the tail after the un-prompted conversation, which templates keep stable.
        bare = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(bare):
            raise ValueError(
                "The chat template does not render the conversation as a prefix of the "
                "conversation plus the answer, so prompt tokens cannot be masked exactly."
            )
        return full[len(bare) :]
    return full[len(prompt) :]


def encode_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    return tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False)["input_ids"]


def encode_example(
    tokenizer: Any, messages: list[dict[str, str]], answer: str, max_length: int
) -> EncodedExample:
    """Encode prompt and completion; over ``max_length`` the prompt loses tokens from its
    start (the answer and the generation prompt at its end are kept) and it is flagged."""
    prompt_ids = encode_prompt(tokenizer, messages)
    completion_ids = tokenizer(
        completion_text(tokenizer, messages, answer), add_special_tokens=False
    )["input_ids"]
    if len(completion_ids) >= max_length:
        raise ValueError(
            f"the answer alone is {len(completion_ids)} tokens, over max_length={max_length}"
        )
    overflow = len(prompt_ids) + len(completion_ids) - max_length
    if overflow > 0:
        return EncodedExample(prompt_ids[overflow:], completion_ids, truncated=True)
    return EncodedExample(prompt_ids, completion_ids)


def collate_sft(batch: list[EncodedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids with labels that are IGNORE_INDEX on prompt and padding."""
    length = max(len(e.prompt_ids) + len(e.completion_ids) for e in batch)
    input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, example in enumerate(batch):
        ids = example.prompt_ids + example.completion_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(example.prompt_ids) : len(ids)] = torch.tensor(example.completion_ids)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class EncodedPair:
    """A preference pair: one prompt, two completions."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False


def encode_pair(
    tokenizer: Any, messages: list[dict[str, str]], chosen: str, rejected: str, max_length: int
) -> EncodedPair:
    """Encode both completions after one prompt, cutting the prompt's start so that the
    longer of the two sequences fits in ``max_length``."""
    chosen_example = encode_example(tokenizer, messages, chosen, max_length)
    rejected_ids = tokenizer(
        completion_text(tokenizer, messages, rejected), add_special_tokens=False
    )["input_ids"]
    full_prompt = encode_prompt(tokenizer, messages)
    longest = max(len(chosen_example.completion_ids), len(rejected_ids))
    if longest >= max_length:
        raise ValueError(f"a completion is {longest} tokens, over max_length={max_length}")
    overflow = len(full_prompt) + longest - max_length
    prompt_ids = full_prompt[overflow:] if overflow > 0 else full_prompt
    return EncodedPair(prompt_ids, chosen_example.completion_ids, rejected_ids, overflow > 0)


def collate_pairs(batch: list[EncodedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows (TRL's order), for one concatenated forward."""
    rows = [EncodedExample(p.prompt_ids, p.chosen_ids) for p in batch]
    rows += [EncodedExample(p.prompt_ids, p.rejected_ids) for p in batch]
    return collate_sft(rows, pad_token_id)


def collate_pairs_shared_prompt(
    batch: list[EncodedPair], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """One left-padded prompt per pair and both completions right-padded after it (chosen
    rows, then rejected rows), so the prompt is run once for the two completions."""
    prompt_length = max(len(p.prompt_ids) for p in batch)
    prompt_ids = torch.full((len(batch), prompt_length), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(batch), prompt_length), dtype=torch.long)
    for row, pair in enumerate(batch):
        start = prompt_length - len(pair.prompt_ids)
        prompt_ids[row, start:] = torch.tensor(pair.prompt_ids)
        prompt_mask[row, start:] = 1
    completions = [p.chosen_ids for p in batch] + [p.rejected_ids for p in batch]
    completion_length = max(len(c) for c in completions)
    completion_ids = torch.full((len(completions), completion_length), pad_token_id)
    completion_mask = torch.zeros((len(completions), completion_length), dtype=torch.long)
    for row, ids in enumerate(completions):
        completion_ids[row, : len(ids)] = torch.tensor(ids)
        completion_mask[row, : len(ids)] = 1
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
    }
