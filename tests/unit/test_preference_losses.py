"""ORPO, SimPO and KTO losses against TRL 1.16's own code, in float64, to 1e-6.

As in ``test_dpo_loss.py``, TRL's real methods run (``ORPOTrainer.get_batch_loss_metrics``,
``CPOTrainer.get_batch_loss_metrics`` with ``loss_type="simpo"``, ``KTOTrainer._compute_loss``)
on a trainer object whose ``__init__`` was skipped and a fake model whose outputs give each
completion the summed log-prob we choose. Completions have different lengths, so a missing or
wrong length normalisation shows."""

from __future__ import annotations

import math
import os
import types
from collections import defaultdict

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer
from trl.trainer.kto_trainer import KTOTrainer

from clintune.methods.losses import (
    chosen_nll,
    kto_kl_estimate,
    kto_loss,
    orpo_log_odds,
    orpo_loss,
    simpo_loss,
)

TOL = 1e-6
SEEDS = (0, 1, 2)
BATCH = 6
VOCAB = 8


def _identity(x):
    return x


def _accelerator() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        device=torch.device("cpu"), gather=_identity, gather_for_metrics=_identity
    )


def _random_lengths(generator: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = torch.randint(1, 12, (batch,), generator=generator)
    rejected = torch.randint(1, 12, (batch,), generator=generator)
    if torch.equal(chosen, rejected):  # never with these seeds; guards the premise
        rejected = rejected + 1
    return chosen, rejected


def _summed_logps(lengths: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Summed log-probs whose per-token means lie in [-3, -0.05]: both sides of ORPO's
    log1mexp switch at -ln 2, and far enough from 0 for every token's probability."""
    means = -(0.05 + 2.95 * torch.rand(lengths.numel(), generator=generator, dtype=torch.float64))
    return means * lengths


def _token_split(total: float, length: int) -> torch.Tensor:
    """An uneven split of a row's summed log-prob over its tokens (no token holds it all)."""
    weights = torch.arange(1, length + 1, dtype=torch.float64)
    return total * weights / weights.sum()


# --------------------------------------------------------------------------- ORPO and SimPO


class _LogitsModel:
    """Stands in for a causal LM over the concatenated [chosen; rejected] rows: returns
    logits under which each completion token has the log-prob we laid out."""

    def __init__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> None:
        self.input_ids, self.logits = input_ids, logits
        self.calls = 0

    def __call__(self, input_ids, *, attention_mask, use_cache, **kwargs):
        assert not kwargs and use_cache is False
        assert torch.equal(input_ids, self.input_ids)
        self.calls += 1
        return types.SimpleNamespace(logits=self.logits)


def _pair_batch(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    prompt_length: int,
    generator: torch.Generator,
) -> tuple[dict[str, torch.Tensor], _LogitsModel]:
    """TRL's paired batch (chosen_*/rejected_* input ids, masks, labels; prompt then
    completion then right padding) and the model that scores it."""
    lengths = torch.cat([chosen_lengths, rejected_lengths])
    totals = torch.cat([chosen_logps, rejected_logps])
    rows, seq = lengths.numel(), prompt_length + int(lengths.max()) + 2
    input_ids = torch.zeros(rows, seq, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    logits = torch.zeros(rows, seq, VOCAB, dtype=torch.float64)
    for row, (length, total) in enumerate(zip(lengths.tolist(), totals.tolist(), strict=True)):
        end = prompt_length + length
        input_ids[row, :end] = torch.randint(1, VOCAB, (end,), generator=generator)
        attention[row, :end] = 1
        labels[row, prompt_length:end] = input_ids[row, prompt_length:end]
        for offset, logp in enumerate(_token_split(total, length).tolist()):
            position = prompt_length + offset  # predicted by the logits one position earlier
            target = int(input_ids[row, position])
            # The other tokens share 1 - p(target) evenly, so the row is normalised.
            rest = math.log((1 - math.exp(logp)) / (VOCAB - 1))
            logits[row, position - 1] = rest
            logits[row, position - 1, target] = logp
    half = rows // 2
    batch = {}
    for side, part in (("chosen", slice(0, half)), ("rejected", slice(half, rows))):
        batch[f"{side}_input_ids"] = input_ids[part]
        batch[f"{side}_attention_mask"] = attention[part]
        batch[f"{side}_labels"] = labels[part]
    return batch, _LogitsModel(input_ids, logits)


def _orpo_trainer(beta: float) -> ORPOTrainer:
    trainer = object.__new__(ORPOTrainer)  # TRL's methods, without building a real trainer
    trainer.__dict__.update(
        is_encoder_decoder=False,
        padding_value=0,
        accelerator=_accelerator(),
        aux_loss_enabled=False,
        beta=beta,
    )
    return trainer


def _cpo_trainer(beta: float, gamma: float, label_smoothing: float) -> CPOTrainer:
    trainer = object.__new__(CPOTrainer)
    trainer.__dict__.update(
        is_encoder_decoder=False,
        pad_token_id=0,
        accelerator=_accelerator(),
        aux_loss_enabled=False,
        beta=beta,
        label_smoothing=label_smoothing,
        loss_type="simpo",
        cpo_alpha=0.0,  # pure SimPO: no behaviour-cloning term
        simpo_gamma=gamma,
        alpha=0.0,
    )
    return trainer


def _trl_pairwise(trainer, pc, pr, cl, rl, *, prompt_length: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    batch, model = _pair_batch(pc, pr, cl, rl, prompt_length=prompt_length, generator=generator)
    loss, metrics = trainer.get_batch_loss_metrics(model, batch, train_eval="train")
    assert model.calls == 1
    return float(loss), metrics


def _pairwise_inputs(seed: int, batch: int = BATCH):
    generator = torch.Generator().manual_seed(seed)
    cl, rl = _random_lengths(generator, batch)
    return _summed_logps(cl, generator), _summed_logps(rl, generator), cl, rl


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_matches_trl(seed: int, beta: float) -> None:
    pc, pr, cl, rl = _pairwise_inputs(seed)
    trainer = _orpo_trainer(beta)
    # One-token prompts: TRL's NLL over prompt and completion is then the completion's.
    trl_loss, metrics = _trl_pairwise(trainer, pc, pr, cl, rl, prompt_length=1, seed=seed)

    # The batch: TRL's NLL is token-weighted over the batch's chosen tokens.
    losses, chosen_rewards, rejected_rewards = orpo_loss(
        pc, pr, chosen_lengths=cl, rejected_lengths=rl, beta=beta, nll_num_tokens=cl.sum()
    )
    assert losses.shape == chosen_rewards.shape == (BATCH,) and losses.dtype == torch.float64
    assert losses.mean().item() == pytest.approx(trl_loss, abs=TOL, rel=TOL)
    assert metrics["logps/chosen"] == pytest.approx((pc / cl).mean().item(), abs=TOL)
    assert metrics["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), abs=TOL)
    assert metrics["rewards/rejected"] == pytest.approx(rejected_rewards.mean().item(), abs=TOL)
    margins = (chosen_rewards - rejected_rewards).mean().item()
    assert metrics["rewards/margins"] == pytest.approx(margins, abs=TOL)
    token_nll = (-pc.sum() / cl.sum()).item()
    assert metrics["nll_loss"] == pytest.approx(token_nll, abs=TOL, rel=TOL)
    log_odds = orpo_log_odds(pc / cl, pr / rl)
    assert metrics["log_odds_chosen"] == pytest.approx(log_odds.mean().item(), abs=TOL)
    ratio = torch.nn.functional.logsigmoid(log_odds).mean().item()
    assert metrics["log_odds_ratio"] == pytest.approx(ratio, abs=TOL)

    # Each pair alone: the default (per-example mean) NLL is TRL's for a batch of one.
    per_example, _, _ = orpo_loss(pc, pr, chosen_lengths=cl, rejected_lengths=rl, beta=beta)
    for i in range(BATCH):
        one = [t[i : i + 1] for t in (pc, pr, cl, rl)]
        trl_loss_i, metrics_i = _trl_pairwise(trainer, *one, prompt_length=1, seed=seed + i)
        assert per_example[i].item() == pytest.approx(trl_loss_i, abs=TOL, rel=TOL)
        assert chosen_rewards[i].item() == pytest.approx(metrics_i["rewards/chosen"], abs=TOL)
        assert rejected_rewards[i].item() == pytest.approx(metrics_i["rewards/rejected"], abs=TOL)


def test_orpo_nll_covers_the_completion_where_trl_adds_the_prompt() -> None:
    """The documented difference: with longer prompts TRL's NLL also counts prompt tokens
    (here scored at log-prob log(1/VOCAB) each), ours only the chosen completion's."""
    pc, pr, cl, rl = _pairwise_inputs(5)
    same, _ = _trl_pairwise(_orpo_trainer(0.1), pc, pr, cl, rl, prompt_length=1, seed=5)
    longer, _ = _trl_pairwise(_orpo_trainer(0.1), pc, pr, cl, rl, prompt_length=4, seed=5)
    ours = orpo_loss(pc, pr, chosen_lengths=cl, rejected_lengths=rl, nll_num_tokens=cl.sum())[0]
    assert ours.mean().item() == pytest.approx(same, abs=TOL)
    assert abs(longer - same) > 1e-3


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    ("beta", "gamma", "label_smoothing"), [(2.0, 1.0, 0.0), (2.5, 1.4, 0.0), (0.5, 0.3, 0.2)]
)
def test_simpo_matches_trl(seed: int, beta: float, gamma: float, label_smoothing: float) -> None:
    pc, pr, cl, rl = _pairwise_inputs(seed)
    trainer = _cpo_trainer(beta, gamma, label_smoothing)
    kwargs = {"beta": beta, "gamma": gamma, "label_smoothing": label_smoothing}
    losses, chosen_rewards, rejected_rewards = simpo_loss(
        pc, pr, chosen_lengths=cl, rejected_lengths=rl, **kwargs
    )
    trl_loss, metrics = _trl_pairwise(trainer, pc, pr, cl, rl, prompt_length=3, seed=seed)
    assert losses.mean().item() == pytest.approx(trl_loss, abs=TOL, rel=TOL)
    assert metrics["logps/chosen"] == pytest.approx((pc / cl).mean().item(), abs=TOL)
    assert metrics["logps/rejected"] == pytest.approx((pr / rl).mean().item(), abs=TOL)
    assert metrics["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), abs=TOL)
    assert metrics["rewards/rejected"] == pytest.approx(rejected_rewards.mean().item(), abs=TOL)
    accuracy = (chosen_rewards > rejected_rewards).double().mean().item()
    assert metrics["rewards/accuracies"] == pytest.approx(accuracy, abs=TOL)
    assert metrics["nll_loss"] == 0.0
    for i in range(BATCH):
        one = [t[i : i + 1] for t in (pc, pr, cl, rl)]
        trl_loss_i, _ = _trl_pairwise(trainer, *one, prompt_length=2, seed=seed + i)
        assert losses[i].item() == pytest.approx(trl_loss_i, abs=TOL, rel=TOL)


def test_the_pairwise_stand_ins_exercise_trl_code() -> None:
    pc, pr, cl, rl = _pairwise_inputs(7)
    low, _ = _trl_pairwise(_cpo_trainer(2.0, 1.0, 0.0), pc, pr, cl, rl, prompt_length=1, seed=7)
    high, _ = _trl_pairwise(_cpo_trainer(2.0, 2.0, 0.0), pc, pr, cl, rl, prompt_length=1, seed=7)
    assert high > low + 1e-3  # gamma reaches TRL's loss
    # Length normalisation matters on these inputs: summed log-probs give another loss.
    ones = torch.ones_like(cl)
    unnormalised = simpo_loss(pc, pr, chosen_lengths=ones, rejected_lengths=ones)[0]
    assert abs(unnormalised.mean().item() - low) > 1e-3
    with pytest.raises(ValueError, match="Unknown loss type"):
        bad = _cpo_trainer(2.0, 1.0, 0.0)
        bad.loss_type = "nope"
        _trl_pairwise(bad, pc, pr, cl, rl, prompt_length=1, seed=7)


# --------------------------------------------------------------------------- KTO


class _KTOModel:
    """TRL's fused-LM-head output for two sets of rows (the examples, and their mismatched
    KL pairs), told apart by their input ids."""

    def __init__(self, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.rows = rows  # (input_ids, per-row summed log-probs)
        self.training = True
        self.calls = 0

    def __call__(self, *, input_ids, attention_mask, labels, fused_lm_head, use_cache=None):
        assert fused_lm_head is True
        self.calls += 1
        (row_logps,) = [logps for ids, logps in self.rows if torch.equal(ids, input_ids)]
        shift_mask = (labels[:, 1:] != -100).to(torch.float64)
        weights = torch.arange(1, shift_mask.size(1) + 1, dtype=torch.float64) * shift_mask
        weights = weights / weights.sum(dim=1, keepdim=True)
        log_probs = weights * row_logps.unsqueeze(1)
        shape = log_probs.shape
        return types.SimpleNamespace(
            log_probs=log_probs,
            entropy=torch.zeros(shape, dtype=torch.float64),
            mean_logits=torch.zeros(shape, dtype=torch.float64),
        )


def _kto_trainer(model: _KTOModel, beta: float, weights: tuple[float, float]) -> KTOTrainer:
    trainer = object.__new__(KTOTrainer)
    trainer.__dict__.update(
        model=model,
        accelerator=_accelerator(),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        calculate_KL=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=weights[0],
        undesirable_weight=weights[1],
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    return trainer


def _rows(lengths: torch.Tensor, generator: torch.Generator):
    prompt = torch.randint(1, 5, (lengths.numel(),), generator=generator)
    seq = int((prompt + lengths).max()) + 1
    ids = torch.zeros(lengths.numel(), seq, dtype=torch.long)
    attention, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for row, (p, c) in enumerate(zip(prompt.tolist(), lengths.tolist(), strict=True)):
        ids[row, : p + c] = torch.randint(3, 500, (p + c,), generator=generator)
        attention[row, : p + c] = 1
        completion[row, p : p + c] = 1
    return ids, attention, completion


def trl_kto(policy, ref, desirable, policy_kl, ref_kl, lengths, kl_lengths, *, beta, weights, seed):
    generator = torch.Generator().manual_seed(seed)
    ids, attention, completion = _rows(lengths, generator)
    kl_ids, kl_attention, kl_completion = _rows(kl_lengths, generator)
    model = _KTOModel([(ids, policy), (kl_ids, policy_kl)])
    trainer = _kto_trainer(model, beta, weights)
    inputs = {
        "input_ids": ids,
        "attention_mask": attention,
        "completion_mask": completion,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": kl_attention,
        "KL_completion_mask": kl_completion,
        "label": desirable,
        "ref_logps": ref,
        "ref_KL_logps": ref_kl,
    }
    loss = KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    assert model.calls == 2  # the examples and their KL pairs
    return float(loss), {name: values[-1] for name, values in trainer._metrics["train"].items()}


def _kto_inputs(seed: int, batch: int = BATCH, kl_shift: float = 0.0):
    generator = torch.Generator().manual_seed(seed)
    lengths, kl_lengths = _random_lengths(generator, batch)

    def logps(size: int = batch) -> torch.Tensor:
        return -30 * torch.rand(size, generator=generator, dtype=torch.float64)

    desirable = torch.zeros(batch, dtype=torch.bool)
    desirable[torch.randperm(batch, generator=generator)[: batch // 2 + seed % 2]] = True
    policy_kl = logps()
    ref_kl = policy_kl - kl_shift - 2 * torch.rand(batch, generator=generator, dtype=torch.float64)
    return logps(), logps(), desirable, policy_kl, ref_kl, lengths, kl_lengths


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("beta", "weights"), [(0.1, (1.0, 1.0)), (0.5, (1.0, 1.33))])
def test_kto_matches_trl(seed: int, beta: float, weights: tuple[float, float]) -> None:
    policy, ref, desirable, policy_kl, ref_kl, lengths, kl_lengths = _kto_inputs(seed)
    kl = kto_kl_estimate(policy_kl, ref_kl)
    assert kl > 0.1  # the reference point is in play
    losses, chosen_rewards, rejected_rewards = kto_loss(
        policy,
        ref,
        desirable,
        kl,
        beta=beta,
        desirable_weight=weights[0],
        undesirable_weight=weights[1],
    )
    assert losses.shape == (BATCH,) and losses.dtype == torch.float64
    assert chosen_rewards.numel() == int(desirable.sum()) and rejected_rewards.numel() == int(
        (~desirable).sum()
    )
    trl_loss, metrics = trl_kto(
        policy, ref, desirable, policy_kl, ref_kl, lengths, kl_lengths,
        beta=beta, weights=weights, seed=seed,
    )  # fmt: skip
    assert losses.mean().item() == pytest.approx(trl_loss, abs=TOL, rel=TOL)
    assert metrics["kl"] == pytest.approx(kl.item(), abs=TOL)
    assert metrics["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), abs=TOL)
    assert metrics["rewards/rejected"] == pytest.approx(rejected_rewards.mean().item(), abs=TOL)
    assert metrics["logps/chosen"] == pytest.approx(policy[desirable].mean().item(), abs=TOL)
    assert metrics["logps/rejected"] == pytest.approx(policy[~desirable].mean().item(), abs=TOL)
    margins = chosen_rewards.mean() - rejected_rewards.mean()
    assert metrics["rewards/margins"] == pytest.approx(margins.item(), abs=TOL)

    # Each example alone, with the batch's reference point: one KL row carrying it.
    for i in range(BATCH):
        one = [t[i : i + 1] for t in (policy, ref, desirable)]
        kl_row = (kl.reshape(1), torch.zeros(1, dtype=torch.float64))
        trl_loss_i, metrics_i = trl_kto(
            *one, *kl_row, lengths[i : i + 1], kl_lengths[i : i + 1],
            beta=beta, weights=weights, seed=seed + i,
        )  # fmt: skip
        assert losses[i].item() == pytest.approx(trl_loss_i, abs=TOL, rel=TOL)
        side = "chosen" if desirable[i] else "rejected"
        reward = beta * (policy[i] - ref[i]).item()
        assert metrics_i[f"rewards/{side}"] == pytest.approx(reward, abs=TOL)


def test_kto_clamps_a_negative_reference_point_as_trl_does() -> None:
    policy, ref, desirable, policy_kl, ref_kl, lengths, kl_lengths = _kto_inputs(3, kl_shift=-5)
    kl = kto_kl_estimate(policy_kl, ref_kl)
    assert kl < 0
    losses, _, _ = kto_loss(policy, ref, desirable, kl, beta=0.1)
    zero, _, _ = kto_loss(policy, ref, desirable, torch.zeros(()), beta=0.1)
    torch.testing.assert_close(losses, zero, atol=0, rtol=0)
    trl_loss, metrics = trl_kto(
        policy, ref, desirable, policy_kl, ref_kl, lengths, kl_lengths,
        beta=0.1, weights=(1.0, 1.0), seed=3,
    )  # fmt: skip
    assert metrics["kl"] == 0.0
    assert losses.mean().item() == pytest.approx(trl_loss, abs=TOL)


def test_kto_reference_point_moves_both_sides_against_each_other() -> None:
    policy, ref, desirable, *_ = _kto_inputs(0)
    low, _, _ = kto_loss(policy, ref, desirable, torch.tensor(0.0))
    high, _, _ = kto_loss(policy, ref, desirable, torch.tensor(3.0))
    assert (high[desirable] > low[desirable]).all()
    assert (high[~desirable] < low[~desirable]).all()


# --------------------------------------------------------------------------- shared pieces


def test_chosen_nll_per_example_and_token_weighted() -> None:
    logps = torch.tensor([-6.0, -1.0, -9.0], dtype=torch.float64)
    lengths = torch.tensor([3, 1, 6])
    torch.testing.assert_close(chosen_nll(logps, lengths), torch.tensor([2.0, 1.0, 1.5]).double())
    weighted = chosen_nll(logps, lengths, num_tokens=lengths.sum())
    assert weighted.mean().item() == pytest.approx(16.0 / 10.0)
    # Two data-parallel ranks, each passing the global count / 2: the mean of their means is
    # the global token-weighted NLL.
    halves = [chosen_nll(logps[:2], lengths[:2], 5.0), chosen_nll(logps[2:], lengths[2:], 5.0)]
    assert ((halves[0].mean() + halves[1].mean()) / 2).item() == pytest.approx(16.0 / 10.0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x, n: orpo_loss(x, x, chosen_lengths=n, rejected_lengths=n, beta=0), "beta"),
        (lambda x, n: simpo_loss(x, x, chosen_lengths=n, rejected_lengths=n, beta=-1), "beta"),
        (
            lambda x, n: simpo_loss(
                x, x, chosen_lengths=n, rejected_lengths=n, label_smoothing=0.5
            ),
            "label_smoothing",
        ),
        (lambda x, n: kto_loss(x, x, n > 1, torch.tensor(0.0), beta=0), "beta"),
        (lambda x, n: kto_loss(x, x, n > 1, torch.tensor(0.0), desirable_weight=-1), "weight"),
    ],
)
def test_invalid_inputs_raise(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(torch.tensor([-3.0, -4.0]), torch.tensor([1, 2]))
