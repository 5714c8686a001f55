"""Gradient checkpointing (non-reentrant) changes memory, not the maths: same loss, same
gradients, with full fine-tuning and with LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import compose_train

from clintune.methods.losses import sft_loss
from clintune.models.loading import load_for_training, uses_gradient_checkpointing
from clintune.tokenization import collate_sft, encode_example

MESSAGES = [
    [{"role": "user", "content": "Dysuria and nitrite positive. Criteria met?"}],
    [{"role": "user", "content": "Cough only, urinalysis normal, urine WBC 2/hpf. Criteria met?"}],
]


def _loss_and_grads(
    overrides: list[str], cache_dir: Path
) -> tuple[float, dict[str, torch.Tensor], bool]:
    cfg = compose_train(["model=tiny_llama", *overrides], cache_dir)
    torch.manual_seed(0)  # LoRA's A matrices are drawn when the adapter is created
    loaded, _ = load_for_training(cfg.model, cache_dir)
    model = loaded.model
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # a non-trivial adapter, so its gradients carry signal
            parameter.data.normal_(0, 0.02)
    model.eval()  # no dropout: both runs must see the same function
    batch = collate_sft(
        [
            encode_example(loaded.tokenizer, m, a, 256)
            for m, a in zip(MESSAGES, ["yes", "no"], strict=True)
        ],
        loaded.tokenizer.pad_token_id,
    )
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = sft_loss(logits, batch["labels"])
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads, uses_gradient_checkpointing(model)


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(
    lora: bool, tiny_models, cache_dir
) -> None:
    common = [f"model.lora.enabled={str(lora).lower()}"]
    plain_loss, plain, plain_flag = _loss_and_grads(common, cache_dir)
    ckpt_loss, ckpt, ckpt_flag = _loss_and_grads(
        [*common, "model.gradient_checkpointing=true"], cache_dir
    )
    assert not plain_flag and ckpt_flag
    assert ckpt_loss == pytest.approx(plain_loss, abs=1e-6)
    assert plain.keys() == ckpt.keys() and plain
    if lora:
        assert all("lora_" in name for name in plain)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)
