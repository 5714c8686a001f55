"""DPOModule on a real tiny model: the three reference modes agree, a LoRA policy started
from an SFT adapter uses the SFT model as its reference, the NaN guard stops training with
the last good weights intact, and the logged metrics carry TRL's names."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import compose_train
from peft import LoraConfig, TaskType, get_peft_model
from torch.utils.data import DataLoader

from clintune.checkpointing import SaveWeights
from clintune.methods.dpo import DPOModule, adapter_disabled, precompute_reference_logps
from clintune.methods.losses import DPO_LOSS_TYPES, dpo_loss
from clintune.models.loading import (
    CHECKPOINT_MANIFEST,
    load_for_training,
    load_model,
    save_trained,
)
from clintune.tokenization import IGNORE_INDEX, EncodedPair, collate_pairs, encode_pair

# One worker runs this module under -n: its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("dpo_module")

TOL = 1e-5
INSTRUCTION = "Does this note meet the UTI criteria? Answer yes or no."
PAIRS = [
    ("Dysuria for two days; urine nitrite positive.", "yes", "no"),
    ("Cough and fever; urinalysis negative.", "no", "yes"),
    ("Urinary frequency, 14 WBC/hpf.", "yes", "no, the criteria are not met"),
    ("Knee pain after a fall. No urinary symptoms.", "no", "yes"),
]
TRL_NAMES = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
)


# --------------------------------------------------------------------------- helpers


def _messages(note: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{INSTRUCTION}\n\n{note}"}]


def _encoded(tokenizer: Any, pairs=PAIRS) -> list[EncodedPair]:
    return [encode_pair(tokenizer, _messages(n), c, r, max_length=256) for n, c, r in pairs]


def _batch(tokenizer: Any, pairs=PAIRS) -> dict[str, torch.Tensor]:
    return collate_pairs(_encoded(tokenizer, pairs), tokenizer.pad_token_id)


def _base(source: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)


def _lora(model: torch.nn.Module) -> torch.nn.Module:
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules="all-linear",
    )
    return get_peft_model(model, config)


def _perturb_lora_b(model: torch.nn.Module, seed: int, scale: float = 0.05) -> int:
    """Non-zero lora_B weights, so that the adapter changes the model; returns how many."""
    generator = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
                changed += 1
    return changed


@torch.no_grad()
def _row_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    chosen, rejected, _ = precompute_reference_logps(model, [batch])
    return torch.cat([chosen, rejected])


def _with_reference(batch: dict[str, torch.Tensor], reference: torch.nn.Module) -> dict:
    chosen, rejected, tokens = precompute_reference_logps(reference, [batch])
    assert tokens == int(batch["attention_mask"].sum())
    return {**batch, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}


def _module(model: torch.nn.Module, **kwargs: Any) -> DPOModule:
    return DPOModule(model, learning_rate=1e-3, beta=0.5, **kwargs)


@pytest.fixture(scope="module")
def llama(tiny_models) -> Any:
    return tiny_models["tiny_llama"]


# --------------------------------------------------------------------------- reference modes


def test_reference_modes_give_the_same_losses_and_rewards(llama) -> None:
    torch.manual_seed(0)
    batch = _batch(llama.tokenizer)
    policy = _lora(_base(llama.source))
    base_logps = _row_logps(_base(llama.source), batch)

    # LoRA starts with B = 0: the policy is the base model, every implicit reward is zero.
    assert torch.allclose(_row_logps(policy, batch), base_logps, atol=TOL)
    start = _module(policy, reference="adapter_disabled").pair_losses(batch)
    assert torch.allclose(start["losses"], torch.full((4,), math.log(2.0)), atol=TOL)

    assert _perturb_lora_b(policy, seed=1) > 0
    assert not torch.allclose(_row_logps(policy, batch), base_logps, atol=1e-3)

    precompute = _module(policy, reference="precompute").pair_losses(
        _with_reference(batch, _base(llama.source))
    )
    copied = _module(policy, reference="copy", reference_model=_base(llama.source)).pair_losses(
        batch
    )
    disabled_module = _module(policy, reference="adapter_disabled")
    disabled = disabled_module.pair_losses(batch)

    # The policy really moved away from the reference: losses are not all log 2.
    assert (precompute["losses"] - math.log(2.0)).abs().max() > 1e-3
    for name in ("losses", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert torch.allclose(copied[name], precompute[name], atol=TOL), name
        assert torch.allclose(disabled[name], precompute[name], atol=TOL), name
    # Rewards are beta times the log-ratio to the base model's log-probs.
    chosen_base, _ = base_logps.chunk(2)
    expected = 0.5 * (precompute["logps/chosen"] - chosen_base)
    assert torch.allclose(precompute["rewards/chosen"], expected, atol=TOL)
    # The adapter is back on after the reference pass.
    assert torch.allclose(
        _row_logps(policy, batch),
        torch.cat([precompute["logps/chosen"], precompute["logps/rejected"]]),
        atol=TOL,
    )
    # Only live reference passes count reference tokens (the module is in training mode).
    assert disabled_module.reference_tokens == int(batch["attention_mask"].sum())


def test_copy_reference_stays_frozen_and_out_of_the_optimiser(llama) -> None:
    reference = _base(llama.source)
    module = _module(_base(llama.source), reference="copy", reference_model=reference)
    assert all(not p.requires_grad for p in reference.parameters())
    assert not reference.training
    assert not any(p is q for p in module.parameters() for q in reference.parameters())
    with pytest.raises(ValueError, match="reference model"):
        _module(_base(llama.source), reference="copy")
    with pytest.raises(ValueError, match=r"method\.reference"):
        _module(_base(llama.source), reference="frozen")
    with pytest.raises(ValueError, match="LoRA policy"):
        _module(_base(llama.source), reference="adapter_disabled").pair_losses(
            _batch(llama.tokenizer)
        )


def test_adapter_disabled_reference_from_an_sft_adapter_is_the_sft_model(
    llama, cache_dir: Path, tmp_path: Path
) -> None:
    cfg = compose_train(["model.lora.enabled=true"], cache_dir)
    batch = _batch(llama.tokenizer)

    # An "SFT" adapter that really changes the model.
    sft = load_model(cfg.model, cache_dir, trainable_lora=True)
    assert sft.is_lora
    assert _perturb_lora_b(sft.model, seed=2) > 0
    adapter_dir = tmp_path / "sft_adapter"
    save_trained(sft.model, sft.tokenizer, adapter_dir, info={"base_model": sft.source})
    assert json.loads((adapter_dir / CHECKPOINT_MANIFEST).read_text())["kind"] == "lora"

    sft_logps = _row_logps(load_model(cfg.model, cache_dir, checkpoint=adapter_dir).model, batch)
    base_logps = _row_logps(_base(llama.source), batch)
    assert not torch.allclose(sft_logps, base_logps, atol=1e-3)

    loaded, lineage = load_for_training(cfg.model, cache_dir, init=adapter_dir)
    assert loaded.is_lora and lineage["merged_adapter"] == "init_adapter"
    policy = loaded.model
    # A fresh adapter on the merged SFT weights: the policy starts as the SFT model ...
    assert torch.allclose(_row_logps(policy, batch), sft_logps, atol=TOL)
    _perturb_lora_b(policy, seed=3)
    assert not torch.allclose(_row_logps(policy, batch), sft_logps, atol=1e-3)
    # ... and with its adapter off, it is the SFT model, not the bare base model.
    with adapter_disabled(policy):
        reference_logps = _row_logps(policy, batch)
    assert torch.allclose(reference_logps, sft_logps, atol=TOL)
    assert not torch.allclose(reference_logps, base_logps, atol=1e-3)

    # The policy's adapter has dropout (model.lora.dropout): compare in eval mode.
    def losses(reference: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        module = _module(policy, reference=reference).eval()
        return module.pair_losses(batch)["losses"]

    disabled = losses("adapter_disabled", batch)
    against_sft = losses(
        "precompute",
        {**batch, "ref_chosen_logps": sft_logps[:4], "ref_rejected_logps": sft_logps[4:]},
    )
    against_base = losses(
        "precompute",
        {**batch, "ref_chosen_logps": base_logps[:4], "ref_rejected_logps": base_logps[4:]},
    )
    assert torch.allclose(disabled, against_sft, atol=TOL)
    assert not torch.allclose(disabled, against_base, atol=1e-4)


# --------------------------------------------------------------------------- training


def _items(tokenizer: Any, reference: torch.nn.Module, nan_from: int | None = None) -> list:
    encoded = _encoded(tokenizer)
    loader = DataLoader(
        encoded, batch_size=2, collate_fn=lambda b: collate_pairs(b, tokenizer.pad_token_id)
    )
    chosen, rejected, _ = precompute_reference_logps(reference, loader)
    items = list(zip(encoded, chosen.tolist(), rejected.tolist(), strict=True))
    if nan_from is not None:
        items[nan_from:] = [(pair, float("nan"), r) for pair, _, r in items[nan_from:]]
    return items


def _loader(items: list, tokenizer: Any) -> DataLoader:
    def collate(rows: list) -> dict[str, torch.Tensor]:
        batch = collate_pairs([row[0] for row in rows], tokenizer.pad_token_id)
        batch["ref_chosen_logps"] = torch.tensor([row[1] for row in rows])
        batch["ref_rejected_logps"] = torch.tensor([row[2] for row in rows])
        return batch

    return DataLoader(items, batch_size=2, shuffle=False, collate_fn=collate)


def _trainer(max_steps: int, callbacks: list | None = None, **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks or [],
        **kwargs,
    )


def test_nan_reference_logps_stop_training_and_keep_the_last_good_weights(
    llama, cache_dir: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    cfg = compose_train([], cache_dir)
    model = _base(llama.source)
    train = _items(llama.tokenizer, _base(llama.source), nan_from=2)  # batch 2 holds NaN
    val = _items(llama.tokenizer, _base(llama.source))
    module = _module(model, reference="precompute")
    weights = tmp_path / "model"
    saver = SaveWeights(
        weights, llama.tokenizer, monitor="eval/loss", save="best", info={"method": "dpo"}
    )
    trainer = _trainer(4, [saver], val_check_interval=1)
    with pytest.raises(FloatingPointError, match=r"at global step 1 \(batch 1\)"):
        trainer.fit(module, _loader(train, llama.tokenizer), _loader(val, llama.tokenizer))

    # The save after the good first step survived the failure, complete and loadable.
    manifest = json.loads((weights / CHECKPOINT_MANIFEST).read_text())
    assert manifest["kind"] == "full" and manifest["step"] == 1 and saver.saved_step == 1
    assert math.isfinite(manifest["eval/loss"])
    assert not weights.with_name("model.tmp").exists()
    reloaded = load_model(cfg.model, cache_dir, checkpoint=weights).model
    trained = dict(model.named_parameters())
    for name, parameter in reloaded.named_parameters():
        assert torch.equal(parameter, trained[name]), name
    # It is the trained step, not the initial weights.
    initial = dict(_base(llama.source).named_parameters())
    assert any(not torch.equal(p, initial[n]) for n, p in reloaded.named_parameters())


def test_nan_on_the_first_step_names_step_zero(llama) -> None:
    train = _items(llama.tokenizer, _base(llama.source), nan_from=0)
    module = _module(_base(llama.source), reference="precompute")
    with pytest.raises(FloatingPointError, match="global step 0") as failure:
        _trainer(2).fit(module, _loader(train, llama.tokenizer))
    assert "nan" in str(failure.value).lower()
    assert module.tokens_trained == 0


def test_logged_metrics_carry_trl_names(llama) -> None:
    torch.manual_seed(0)
    train = _items(llama.tokenizer, _base(llama.source))
    module = _module(_base(llama.source), reference="precompute")
    trainer = _trainer(3, limit_val_batches=1, val_check_interval=2)
    trainer.fit(module, _loader(train, llama.tokenizer), _loader(train, llama.tokenizer))
    logged = trainer.callback_metrics
    for prefix in ("train", "eval"):
        for name in TRL_NAMES:
            key = f"{prefix}/{name}"
            assert key in logged, (key, sorted(logged))
            assert torch.isfinite(logged[key]), key
    assert 0.0 <= float(logged["train/rewards/accuracies"]) <= 1.0
    margin = logged["train/rewards/chosen"] - logged["train/rewards/rejected"]
    assert float(logged["train/rewards/margins"]) == pytest.approx(float(margin), abs=1e-5)
    assert trainer.global_step == 3
    assert module.tokens_trained > 0 and module.reference_tokens == 0


def test_each_loss_type_trains_on_the_loss_it_names(llama) -> None:
    """One real training step per loss type: the logged loss is ``dpo_loss`` of that type on
    the same log-probs, and the types give different losses, so a loss_type that does not
    reach the loss (or reaches the wrong branch) fails."""
    batch = _batch(llama.tokenizer)  # the four pairs in one batch
    chosen, rejected = _row_logps(_base(llama.source), batch).chunk(2)  # before the step
    lengths = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    assert not torch.equal(chosen_lengths, rejected_lengths)  # IPO's normalisation shows
    # A reference away from the policy, so that the margins are not zero: beta * margin =
    # -0.75 * offsets, of both signs and all below 1 (hinge's loss is not cut to zero).
    offsets = torch.tensor([0.7, -1.3, 2.1, -0.4])
    ref_chosen, ref_rejected = chosen + offsets, rejected - 0.5 * offsets
    batch = {**batch, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    label_smoothing = 0.2  # cDPO for sigmoid; robust differs from sigmoid only when it is > 0

    logged: dict[str, float] = {}
    for loss_type in DPO_LOSS_TYPES:
        module = _module(
            _base(llama.source),
            reference="precompute",
            loss_type=loss_type,
            label_smoothing=label_smoothing,
        )
        trainer = _trainer(1)
        trainer.fit(module, DataLoader([batch], batch_size=None))
        assert trainer.global_step == 1
        logged[loss_type] = float(trainer.callback_metrics["train/loss"])
        expected, _, _ = dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=0.5,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
        )
        assert logged[loss_type] == pytest.approx(float(expected.mean()), abs=TOL, rel=TOL)
    assert set(logged) >= {"ipo", "hinge", "robust"}
    values = sorted(logged.values())
    assert min(b - a for a, b in itertools.pairwise(values)) > 1e-2, logged
