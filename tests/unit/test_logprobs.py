"""Log-probs in chunks of LM-head positions equal the full-logits path (float64: losses and
gradients; bf16: to a stated tolerance), and no full-vocabulary tensor is ever built."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from clintune.methods import logprobs
from clintune.methods.dpo import DPOModule, pair_forward
from clintune.methods.logprobs import chunked_token_logps, sequence_token_logps
from clintune.methods.losses import completion_logps, sft_loss
from clintune.methods.sft import SFTModule
from clintune.tokenization import (
    collate_pairs,
    collate_pairs_shared_prompt,
    collate_sft,
    encode_example,
    encode_pair,
)

# One worker runs this module under -n: its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("logprobs")


def _reference_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    return torch.log_softmax(hidden @ weight.t(), -1).gather(1, targets[:, None]).squeeze(1)


@pytest.mark.parametrize("keep_probabilities", [False, True], ids=["recompute", "keep"])
@pytest.mark.parametrize("chunk_size", [1, 5, 37, 100])
def test_chunks_equal_the_full_log_softmax_with_gradients_in_float64(
    chunk_size: int, keep_probabilities: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both backward paths: recomputing each chunk's logits, or reusing kept probabilities.
    monkeypatch.setattr(logprobs, "KEEP_PROBABILITIES_MAX_ELEMENTS", 10**9 * keep_probabilities)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(101, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.randint(0, 101, (37,), generator=generator)
    upstream = torch.randn(37, dtype=torch.float64, generator=generator)

    expected = _reference_logps(hidden, weight, targets)
    (expected * upstream).sum().backward()
    expected_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    got = chunked_token_logps(hidden, weight, targets, chunk_size)
    (got * upstream).sum().backward()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(hidden.grad, expected_grads[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(weight.grad, expected_grads[1], rtol=0, atol=1e-12)


def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_still_do() -> None:
    hidden = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.float64)  # LoRA: lm_head is not trained
    chunked_token_logps(hidden, weight, torch.arange(6), 4).sum().backward()
    assert weight.grad is None and hidden.grad is not None


def test_bf16_inputs_reduce_in_float32_close_to_float64() -> None:
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(64, 32, generator=generator, dtype=torch.float64)
    weight = torch.randn(500, 32, generator=generator, dtype=torch.float64) / 4
    targets = torch.randint(0, 500, (64,), generator=generator)
    exact = _reference_logps(hidden, weight, targets)
    got = chunked_token_logps(hidden.bfloat16(), weight.bfloat16(), targets, 16)
    assert got.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: the logits are off by up to ~1% of their size, the
    # reduction itself adds no error of its own.
    torch.testing.assert_close(got.double(), exact, rtol=0, atol=0.15)
    assert (got.double() - exact).abs().mean() < 0.03


class _LargestVocabularyTensor(TorchDispatchMode):
    """The largest tensor any op produces whose last dimension is the vocabulary."""

    def __init__(self, vocabulary: int) -> None:
        super().__init__()
        self.vocabulary = vocabulary
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if torch.is_tensor(a)]
        # Views (a transposed weight, say) share an input's storage and allocate nothing.
        shared = {a.untyped_storage().data_ptr() for a in inputs}
        for tensor in out if isinstance(out, tuple | list) else [out]:
            if not torch.is_tensor(tensor) or not tensor.dim():
                continue
            if tensor.untyped_storage().data_ptr() in shared:
                continue
            if tensor.shape[-1] == self.vocabulary:
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.fixture(scope="module")
def model64(tiny_models) -> tuple[Any, Any]:
    loaded = tiny_models["tiny_llama"]
    return copy.deepcopy(loaded.model).double().train(), loaded.tokenizer


def _sft_batch(tokenizer: Any) -> dict[str, torch.Tensor]:
    examples = [
        ("Does this note meet the criteria? Dysuria and nitrite positive.", "yes"),
        ("Short note.", "no, the criteria are not met because there is no urine finding"),
        ("A much longer note " * 20, "yes"),
    ]
    encoded = [
        encode_example(tokenizer, [{"role": "user", "content": q}], a, 512) for q, a in examples
    ]
    return collate_sft(encoded, pad_token_id=tokenizer.pad_token_id)


def _pairs(tokenizer: Any) -> list:
    items = [
        ("Triage: chest pain since this morning.", "physician; emergent", "admin; routine"),
        ("Refill request " * 12, "pharmacist; routine", "physician; urgent and call now"),
    ]
    return [
        encode_pair(tokenizer, [{"role": "user", "content": q}], c, r, 512) for q, c, r in items
    ]


def test_sft_step_equals_the_full_logits_loss_and_gradients(model64: tuple[Any, Any]) -> None:
    model, tokenizer = model64
    batch = _sft_batch(tokenizer)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = sft_loss(logits, batch["labels"])
    expected.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    module = SFTModule(model, learning_rate=1e-3, logits_chunk_size=3)
    logps = module._completion_logps(batch)
    got = -logps.sum() / (batch["labels"][:, 1:] != -100).sum()
    got.backward()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected_grads[name], rtol=0, atol=1e-10)
    model.zero_grad(set_to_none=True)


def _grads(model: Any) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def test_concatenated_pair_forward_equals_the_models_own_logits(model64: tuple[Any, Any]) -> None:
    model, tokenizer = model64
    batch = collate_pairs(_pairs(tokenizer), tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = completion_logps(logits, batch["labels"])
    expected.sum().backward()
    expected_grads = _grads(model)

    out = pair_forward(model, batch, chunk_size=4)
    out.logps.sum().backward()
    torch.testing.assert_close(out.logps, expected, rtol=0, atol=1e-10)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=0, atol=1e-10, msg=name)
    mean_logit = (logits[:, :-1].mean(-1) * (batch["labels"][:, 1:] != -100)).sum(-1)
    torch.testing.assert_close(out.logit_sums, mean_logit.detach(), rtol=0, atol=1e-10)


def test_shared_prompt_pass_equals_full_logits_over_the_same_hidden_states(
    model64: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The layout's own equivalence with the concatenated pass is tests/test_shared_prompt.py;
    here the chunked head is compared with a full log-softmax over the same hidden states."""
    import clintune.methods.dpo as dpo

    model, tokenizer = model64
    batch = collate_pairs_shared_prompt(_pairs(tokenizer), tokenizer.pad_token_id)
    with monkeypatch.context() as patch:
        patch.setattr(dpo, "chunked_token_logps", lambda h, w, t, c: _reference_logps(h, w, t))
        expected = pair_forward(model, batch, chunk_size=4)
        expected.logps.sum().backward()
    expected_grads = _grads(model)

    out = pair_forward(model, batch, chunk_size=4)
    out.logps.sum().backward()
    torch.testing.assert_close(out.logps, expected.logps, rtol=0, atol=1e-10)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=0, atol=1e-10, msg=name)


def test_no_full_vocabulary_tensor_in_forward_or_backward(
    tiny_models, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As for any batch at a large vocabulary: no probabilities kept for the backward pass.
    monkeypatch.setattr(logprobs, "KEEP_PROBABILITIES_MAX_ELEMENTS", 0)
    loaded = tiny_models["tiny_llama"]
    model, tokenizer = copy.deepcopy(loaded.model).train(), loaded.tokenizer
    vocabulary = model.get_output_embeddings().weight.size(0)
    batch = _sft_batch(tokenizer)
    positions = batch["input_ids"].numel()
    chunk = 4
    assert positions * vocabulary > 50 * chunk * vocabulary  # full logits would be far larger

    watch = _LargestVocabularyTensor(vocabulary)
    with watch:
        logps, _, _ = sequence_token_logps(
            model, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk
        )
        (-logps.sum()).backward()
    assert 0 < watch.largest <= chunk * vocabulary

    pairs = collate_pairs_shared_prompt(_pairs(tokenizer), tokenizer.pad_token_id)
    module = DPOModule(model, learning_rate=1e-4, logits_chunk_size=chunk)
    watch = _LargestVocabularyTensor(vocabulary)
    with watch:
        out = pair_forward(module.model, pairs, module.logits_chunk_size)
        out.logps.sum().backward()
    assert 0 < watch.largest <= chunk * vocabulary


def test_the_full_logits_path_would_be_caught(tiny_models) -> None:
    """The watch itself sees a full-vocabulary tensor when one is made."""
    loaded = tiny_models["tiny_llama"]
    batch = _sft_batch(loaded.tokenizer)
    vocabulary = loaded.model.get_output_embeddings().weight.size(0)
    watch = _LargestVocabularyTensor(vocabulary)
    with watch, torch.no_grad():
        loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert watch.largest == batch["input_ids"].numel() * vocabulary


def test_a_small_batch_keeps_its_probabilities_and_a_large_one_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kept probabilities are bounded by the threshold; past it only one chunk exists."""
    hidden = torch.randn(40, 8, requires_grad=True)
    weight = torch.randn(100, 8, requires_grad=True)
    targets = torch.randint(0, 100, (40,))
    for threshold, largest in ((40 * 100, 40 * 100), (40 * 100 - 1, 10 * 100)):
        monkeypatch.setattr(logprobs, "KEEP_PROBABILITIES_MAX_ELEMENTS", threshold)
        watch = _LargestVocabularyTensor(100)
        with watch:
            chunked_token_logps(hidden, weight, targets, 10).sum().backward()
        assert watch.largest == largest, threshold
