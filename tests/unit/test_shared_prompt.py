"""The shared-prompt DPO pass (prompt once, its KV cache tiled for both completions) gives the
same log-probs and gradients as one concatenated chosen+rejected pass, on both chat formats,
with full weights and with LoRA."""

from __future__ import annotations

import pytest
import torch
from helpers import compose_train

from clintune.methods.dpo import pair_forward
from clintune.models.loading import load_model
from clintune.tokenization import collate_pairs, collate_pairs_shared_prompt, encode_pair

PROMPTS = [
    "Criteria met? dysuria",
    "Criteria met? " + "urine WBC 14/hpf, nitrite positive. " * 3,
    "Hi",
]


def _pairs(tokenizer):
    answers = [("yes", "no"), ("provider: nurse; urgency: soon", "no"), ("no", "yes, clearly met")]
    return [
        encode_pair(tokenizer, [{"role": "user", "content": p}], chosen, rejected, 512)
        for p, (chosen, rejected) in zip(PROMPTS, answers, strict=True)
    ]


def _logps_and_grads(model, batch):
    model.zero_grad()
    out = pair_forward(model, batch)
    out.logps.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_mistral"])
@pytest.mark.parametrize("lora", [False, True])
def test_shared_prompt_pass_equals_concatenated_pass(model_name, lora, tiny_models, cache_dir):
    cfg = compose_train(
        [f"model={model_name}", f"model.lora.enabled={str(lora).lower()}"], cache_dir
    )
    torch.manual_seed(0)
    loaded = load_model(cfg.model, cache_dir, trainable_lora=lora)
    model = loaded.model.eval()  # no dropout, so both passes compute the same function
    for name, parameter in model.named_parameters():
        if not lora or "lora_B" in name:
            parameter.data.add_(0.02 * torch.randn_like(parameter))
    pairs = _pairs(loaded.tokenizer)
    pad = loaded.tokenizer.pad_token_id
    concatenated, grads_concatenated = _logps_and_grads(model, collate_pairs(pairs, pad))
    shared, grads_shared = _logps_and_grads(model, collate_pairs_shared_prompt(pairs, pad))
    torch.testing.assert_close(shared.logps, concatenated.logps, rtol=1e-5, atol=5e-5)
    assert torch.equal(shared.lengths, concatenated.lengths)
    torch.testing.assert_close(shared.logit_sums, concatenated.logit_sums, rtol=1e-5, atol=1e-4)
    assert grads_shared.keys() == grads_concatenated.keys() and grads_shared
    for name, grad in grads_concatenated.items():
        torch.testing.assert_close(grads_shared[name], grad, rtol=1e-4, atol=5e-5, msg=name)
    # The point of it: the prompt's tokens are processed once instead of twice.
    assert shared.tokens < concatenated.tokens
    prompt_tokens = sum(len(p.prompt_ids) for p in pairs)
    assert concatenated.tokens - shared.tokens == prompt_tokens
