"""ORPO, SimPO, KTO and RPO modules on a real micro Llama with a real Lightning trainer: a few
steps lower each loss and move its rewards the way the method intends, the metrics carry
TRL's names, and the compute figures count reference tokens only for methods that have a
reference."""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import pytest
import torch
from helpers import micro_llama
from torch.utils.data import DataLoader

from clintune.compute import stage_compute, training_flops
from clintune.methods.dpo import DPOModule, pair_forward
from clintune.methods.kto import KTOModule
from clintune.methods.orpo import ORPOModule
from clintune.methods.simpo import SimPOModule
from clintune.models.loading import count_parameters
from clintune.stages import collate_with_reference
from clintune.tokenization import EncodedPair

PAD = 0
STEPS = 12
LEARNING_RATE = 1e-2

# Completions of different lengths on both sides, so length normalisation matters.
PAIRS = [
    EncodedPair([5, 9, 11, 3], [7, 8], [12, 13, 14, 15, 16]),
    EncodedPair([6, 2], [17, 18, 19], [20]),
    EncodedPair([4, 21, 22], [23], [24, 25, 26]),
    EncodedPair([27, 28, 29, 30, 31], [9, 10, 11, 12], [13, 14]),
]
# KTO: each item is (own completion, mismatched completion of another prompt); half desirable.
UNPAIRED = [
    (EncodedPair([5, 9, 11, 3], [7, 8], [20]), True),
    (EncodedPair([6, 2], [17, 18, 19], [7, 8]), False),
    (EncodedPair([4, 21, 22], [23], [17, 18, 19]), True),
    (EncodedPair([27, 28, 29, 30, 31], [13, 14], [23]), False),
]


def _batch(share_prompt: bool, reference: tuple[torch.Tensor, torch.Tensor] | None = None):
    zeros = [0.0] * len(PAIRS)
    chosen, rejected = reference if reference is not None else (zeros, zeros)
    items = list(zip(PAIRS, list(chosen), list(rejected), strict=True))
    return collate_with_reference(items, PAD, share_prompt)


def _kto_batch(share_prompt: bool) -> dict[str, torch.Tensor]:
    items = [(pair, 0.0, 0.0, wanted) for pair, wanted in UNPAIRED]
    return collate_with_reference(items, PAD, share_prompt)


def _fit(module: L.LightningModule, batch: dict[str, torch.Tensor]) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        val_check_interval=STEPS,
    )
    loader = DataLoader([batch] * STEPS, batch_size=None)
    trainer.fit(module, loader, DataLoader([batch], batch_size=None))
    assert trainer.global_step == STEPS
    return trainer


@torch.no_grad()
def _evaluate(module: L.LightningModule, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    module.eval()
    out = module.pair_losses(batch)
    module.train()
    return out


def _reference_free_compute(module: L.LightningModule, model: torch.nn.Module, stage: str):
    figures = stage_compute(stage, 1.0, module, model, STEPS, reference_tokens=0)
    assert figures[f"compute/{stage}/reference_tokens"] == 0
    total, trainable = count_parameters(model)
    tokens = figures[f"compute/{stage}/tokens"]
    assert tokens == module.tokens_trained > 0
    # Reference-free: the FLOPs are the training passes' alone.
    assert figures[f"compute/{stage}/flops_estimate"] == training_flops(total, trainable, tokens)
    # On CPU: no GPU held, so no GPU-hours (the report shows "— (CPU)").
    assert figures[f"compute/{stage}/gpus"] == figures[f"compute/{stage}/gpu_hours"] == 0


def _logged(trainer: L.Trainer, names: tuple[str, ...]) -> None:
    for prefix in ("train", "eval"):
        for name in ("loss", *names):
            key = f"{prefix}/{name}"
            assert key in trainer.callback_metrics, (key, sorted(trainer.callback_metrics))
            assert torch.isfinite(trainer.callback_metrics[key]), key


PAIRED_NAMES = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
)


@pytest.mark.parametrize("share_prompt", [False, True])
def test_orpo_trains_from_the_base_model_without_a_reference(share_prompt: bool) -> None:
    torch.manual_seed(0)
    model = micro_llama()
    module = ORPOModule(model, learning_rate=LEARNING_RATE, beta=0.5)
    assert module.reference is None
    batch = _batch(share_prompt)
    before = _evaluate(module, batch)
    trainer = _fit(module, batch)
    after = _evaluate(module, batch)
    assert after["losses"].mean() < before["losses"].mean() - 0.1
    # SFT folded in: the chosen answers' NLL falls ...
    assert after["nll_loss"] < before["nll_loss"] - 0.1
    # ... and the odds ratio moves towards the chosen answers.
    assert after["log_odds_chosen"] > before["log_odds_chosen"] + 0.1
    margins = (after["rewards/chosen"] - after["rewards/rejected"]).mean()
    assert margins > (before["rewards/chosen"] - before["rewards/rejected"]).mean()
    _logged(trainer, (*PAIRED_NAMES, "nll_loss", "log_odds_ratio", "log_odds_chosen"))
    assert module.reference_tokens == 0
    _reference_free_compute(module, model, "orpo")


def test_simpo_raises_the_length_normalised_margin_without_a_reference() -> None:
    torch.manual_seed(1)
    model = micro_llama()
    module = SimPOModule(model, learning_rate=LEARNING_RATE, beta=2.0, gamma=1.0)
    assert module.reference is None
    batch = _batch(share_prompt=True)
    before = _evaluate(module, batch)
    trainer = _fit(module, batch)
    after = _evaluate(module, batch)
    assert after["losses"].mean() < before["losses"].mean() - 0.1
    lengths = torch.tensor([[len(p.chosen_ids), len(p.rejected_ids)] for p in PAIRS])
    # Its rewards are beta times per-token log-probs: the logged logps are per token.
    torch.testing.assert_close(after["rewards/chosen"], 2.0 * after["logps/chosen"])
    margins = after["rewards/chosen"] - after["rewards/rejected"]
    assert (margins > before["rewards/chosen"] - before["rewards/rejected"]).all()
    assert lengths[:, 0].ne(lengths[:, 1]).all()
    _logged(trainer, PAIRED_NAMES)
    _reference_free_compute(module, model, "simpo")


def test_kto_pushes_desirable_up_and_undesirable_down_against_its_reference() -> None:
    torch.manual_seed(2)
    model = micro_llama()
    reference = copy.deepcopy(model)
    module = KTOModule(
        model, learning_rate=LEARNING_RATE, beta=0.5, reference="copy", reference_model=reference
    )
    batch = _kto_batch(share_prompt=True)
    before = _evaluate(module, batch)
    assert torch.count_nonzero(before["rewards/chosen"]) == 0  # policy == reference
    trainer = _fit(module, batch)
    after = _evaluate(module, batch)
    assert after["losses"].mean() < before["losses"].mean() - 0.05
    assert (after["rewards/chosen"] > 0).all()  # the desirable examples' log-ratios rose
    assert (after["rewards/rejected"] < 0).all()  # the undesirable ones' fell
    # ... which are the ones the data marks so: log-ratios from the two models themselves.
    with torch.no_grad():
        own, _ = pair_forward(model.eval(), batch).logps.chunk(2)
        own_reference, _ = pair_forward(reference, batch).logps.chunk(2)
    wanted = torch.tensor([flag for _, flag in UNPAIRED])
    assert ((own - own_reference > 0) == wanted).all()
    assert after["rewards/chosen"].numel() == 2 and after["rewards/rejected"].numel() == 2
    names = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen")
    _logged(trainer, (*names, "logps/rejected", "logits/chosen", "logits/rejected"))
    assert "train/rewards/accuracies" not in trainer.callback_metrics  # not a KTO metric
    # A live reference pass per step and one per validation batch, counted in training only.
    per_pass = int(batch["prompt_mask"].sum() + batch["completion_mask"].sum())
    assert module.reference_tokens == STEPS * per_pass
    figures = stage_compute("kto", 1.0, module, model, STEPS, module.reference_tokens)
    assert figures["compute/kto/reference_tokens"] == STEPS * per_pass


def test_kto_logs_only_the_sides_a_batch_has() -> None:
    torch.manual_seed(3)
    model = micro_llama()
    module = KTOModule(
        model, learning_rate=LEARNING_RATE, reference="copy", reference_model=copy.deepcopy(model)
    )
    items = [(pair, 0.0, 0.0, True) for pair, _ in UNPAIRED]
    batch = collate_with_reference(items, PAD, share_prompt=False)
    values = module.logged_values(_evaluate(module, batch))
    assert "rewards/chosen" in values and "rewards/rejected" not in values
    assert "rewards/margins" not in values
    assert values["rewards/chosen"][1] == len(UNPAIRED)


def test_rpo_keeps_the_chosen_likelihood_that_dpo_lets_fall() -> None:
    """The same steps from the same weights: DPO (nll_alpha=0) and RPO (nll_alpha=1). RPO's
    loss is DPO's plus the chosen NLL, and its chosen log-probs end higher."""
    torch.manual_seed(4)
    start = micro_llama()
    batch = _batch(share_prompt=True)
    with torch.no_grad():
        reference_module = DPOModule(copy.deepcopy(start), learning_rate=1.0, reference="copy",
                                     reference_model=copy.deepcopy(start))  # fmt: skip
        initial = _evaluate(reference_module, batch)
    reference = (initial["logps/chosen"], initial["logps/rejected"])
    batch = _batch(share_prompt=True, reference=reference)

    results = {}
    for alpha in (0.0, 1.0):
        module = DPOModule(
            copy.deepcopy(start), learning_rate=LEARNING_RATE, beta=0.5, nll_alpha=alpha
        )
        trainer = _fit(module, batch)
        results[alpha] = (_evaluate(module, batch), trainer, module)
    dpo, rpo = results[0.0][0], results[1.0][0]
    for out in (dpo, rpo):
        assert (out["rewards/chosen"] > out["rewards/rejected"]).all()
    assert rpo["logps/chosen"].mean() > dpo["logps/chosen"].mean() + 0.1
    assert rpo["logps/chosen"].mean() > initial["logps/chosen"].mean()
    # RPO's per-pair losses are DPO's on the same log-probs plus its NLL shares.
    rpo_module = results[1.0][2]
    chosen_lengths = torch.tensor([len(p.chosen_ids) for p in PAIRS])
    nll = -rpo["logps/chosen"] * len(PAIRS) / chosen_lengths.sum()
    dpo_part = rpo["losses"] - nll
    expected = -torch.nn.functional.logsigmoid(rpo["rewards/chosen"] - rpo["rewards/rejected"])
    torch.testing.assert_close(dpo_part, expected, atol=1e-5, rtol=1e-5)
    assert rpo_module.METHOD == "RPO"
    _logged(results[1.0][1], (*PAIRED_NAMES, "nll_loss"))
    assert "train/nll_loss" not in results[0.0][1].callback_metrics  # plain DPO


# --------------------------------------------------------------------------- two ranks


class _OtherRank:
    """A stand-in trainer of a two-rank world whose ``reduce`` adds the other rank's value."""

    world_size = 2

    def __init__(self, other: torch.Tensor) -> None:
        self.other = other
        self.strategy = self

    def reduce(self, value: torch.Tensor, reduce_op: str) -> torch.Tensor:
        assert reduce_op == "sum"
        return value + self.other


def _loss_and_gradients(module: L.LightningModule, batch: dict[str, torch.Tensor]):
    module.zero_grad()
    loss = module.pair_losses(batch)["losses"].mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in module.parameters() if p.requires_grad]


def _halves(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Rank 0 gets items 0-1, rank 1 items 2-3, in the layout the collate gives each rank."""
    rows = batch["completion_ids"].size(0) // 2  # shared-prompt layout: [chosen; rejected]
    halves = []
    for items in (slice(0, 2), slice(2, 4)):
        pair_rows = torch.arange(2 * rows).view(2, rows)[:, items].flatten()
        half = {}
        for key, value in batch.items():
            half[key] = value[pair_rows] if value.size(0) == 2 * rows else value[items]
        halves.append(half)
    return halves


@pytest.mark.parametrize("method", ["orpo", "kto"])
def test_two_ranks_take_the_same_step_as_one_process(method: str) -> None:
    """The global-batch parts of the losses under a faked two-rank world: ORPO's NLL over the
    global batch's chosen tokens (as SFT), KTO's reference point averaged over ranks (as TRL
    gathers it). DDP's mean of the ranks' gradients equals one process's on the whole batch;
    rank-local normalisation would not (the ranks' completion lengths differ)."""
    torch.manual_seed(5)
    model = micro_llama().double()
    if method == "orpo":
        module = ORPOModule(model, learning_rate=1.0, beta=0.5)
        # Chosen answers of 2 + 1 tokens on rank 0 and 3 + 4 on rank 1.
        items = [(PAIRS[i], 0.0, 0.0) for i in (0, 2, 1, 3)]
    else:
        module = KTOModule(model, learning_rate=1.0, beta=0.5, reference="precompute")
        with torch.no_grad():
            logps = pair_forward(model, _kto_batch(share_prompt=True)).logps.chunk(2)
        offsets = torch.tensor([0.5, 1.5, -0.2, 3.0], dtype=torch.float64)
        items = [
            (pair, float(own - 0.3), float(mismatched - offset), wanted)
            for (pair, wanted), own, mismatched, offset in zip(
                UNPAIRED, logps[0], logps[1], offsets, strict=True
            )
        ]
    batch = collate_with_reference(items, PAD, share_prompt=True)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        batch[key] = batch[key].double()
    halves = _halves(batch)

    whole_loss, whole_gradients = _loss_and_gradients(module, batch)
    with torch.no_grad():  # what each rank contributes to the other's reduction
        if method == "orpo":
            shares = [h["completion_mask"][:2].sum().double() for h in halves]
        else:
            shares = []
            for half in halves:
                _, mismatched = pair_forward(model, half).logps.chunk(2)
                shares.append((mismatched - half["ref_rejected_logps"]).mean())
    results = []
    for rank, half in enumerate(halves):
        module.trainer = _OtherRank(shares[1 - rank])  # type: ignore[assignment]
        results.append(_loss_and_gradients(module, half))
    (loss_0, gradients_0), (loss_1, gradients_1) = results
    assert shares[0] != shares[1]  # the ranks' halves really differ
    torch.testing.assert_close((loss_0 + loss_1) / 2, whole_loss)
    for whole, first, second in zip(whole_gradients, gradients_0, gradients_1, strict=True):
        torch.testing.assert_close((first + second) / 2, whole)
