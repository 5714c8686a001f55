"""SFT label masking is exact on both chat formats: only the answer and its end-of-turn
token are trained on; prompt and padding positions are masked."""

from __future__ import annotations

import pytest
import torch

from clintune.methods.losses import sft_loss
from clintune.tokenization import IGNORE_INDEX, collate_sft, encode_example

MESSAGES = [{"role": "user", "content": "Does the note meet the criteria? Dysuria, nitrite +."}]


@pytest.mark.parametrize(
    ("model_name", "prompt_text", "completion_text"),
    [
        (
            "tiny_llama",
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
            "Does the note meet the criteria? Dysuria, nitrite +.<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            "yes<|eot_id|>",
        ),
        (
            "tiny_mistral",
            "<s>[INST] Does the note meet the criteria? Dysuria, nitrite +. [/INST]",
            " yes</s>",
        ),
    ],
)
def test_labels_cover_exactly_the_answer_tokens(
    tiny_models, model_name: str, prompt_text: str, completion_text: str
) -> None:
    tokenizer = tiny_models[model_name].tokenizer
    encoded = encode_example(tokenizer, MESSAGES, "yes", max_length=256)
    assert tokenizer.decode(encoded.prompt_ids) == prompt_text
    assert tokenizer.decode(encoded.completion_ids) == completion_text
    assert encoded.completion_ids[-1] == tokenizer.eos_token_id

    short = encode_example(tokenizer, [{"role": "user", "content": "Hi"}], "no", 256)
    batch = collate_sft([encoded, short], pad_token_id=tokenizer.pad_token_id)
    n_prompt, n_completion = len(encoded.prompt_ids), len(encoded.completion_ids)
    labels = batch["labels"][0].tolist()
    # Hand-checked positions: masked up to the prompt's end, then the answer, then nothing.
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt : n_prompt + n_completion] == encoded.completion_ids
    assert labels[n_prompt + n_completion :] == [IGNORE_INDEX] * (
        len(labels) - n_prompt - n_completion
    )
    assert batch["input_ids"][0, n_prompt - 1].item() == encoded.prompt_ids[-1]

    short_len = len(short.prompt_ids) + len(short.completion_ids)
    row = batch["labels"][1].tolist()
    assert row[: len(short.prompt_ids)] == [IGNORE_INDEX] * len(short.prompt_ids)
    assert row[len(short.prompt_ids) : short_len] == short.completion_ids
    assert all(label == IGNORE_INDEX for label in row[short_len:])
    assert batch["attention_mask"][1, short_len:].sum() == 0
    assert (batch["input_ids"][1, short_len:] == tokenizer.pad_token_id).all()


def test_prompt_is_cut_from_the_start_and_counted(tiny_models) -> None:
    tokenizer = tiny_models["tiny_llama"].tokenizer
    full = encode_example(tokenizer, MESSAGES, "yes", max_length=256)
    limit = len(full.prompt_ids) + len(full.completion_ids) - 5
    cut = encode_example(tokenizer, MESSAGES, "yes", max_length=limit)
    assert cut.truncated and not full.truncated
    assert cut.prompt_ids == full.prompt_ids[5:]
    assert cut.completion_ids == full.completion_ids


def test_sft_loss_is_cross_entropy_on_answer_positions_only() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, -100, 4, 7, -100], [-100, -100, 2, 3, 5, 9]])
    expected_terms = []
    for row, position in [(0, 3), (0, 4), (1, 2), (1, 3), (1, 4), (1, 5)]:
        # the token at `position` is predicted by the logits one step earlier
        log_probs = logits[row, position - 1].log_softmax(-1)
        expected_terms.append(-log_probs[labels[row, position]])
    expected = torch.stack(expected_terms).mean()
    assert torch.allclose(sft_loss(logits, labels), expected)
    # Changing a masked position's logits must not change the loss.
    logits[0, 4] += 100.0  # predicts position 5, which is masked in row 0
    assert torch.allclose(sft_loss(logits, labels), expected)


def test_sft_loss_refuses_a_batch_without_answer_tokens() -> None:
    with pytest.raises(ValueError, match="no completion tokens"):
        sft_loss(torch.zeros(1, 3, 5), torch.full((1, 3), IGNORE_INDEX))
