"""Our DPO loss math against TRL's own: the real ``DPOTrainer._compute_loss`` of TRL 1.16 is
run unbound on a minimal stand-in trainer and a fake model, so the comparison is with TRL's
code, not with a transcription of it. Plus cDPO, input validation, ``completion_logps`` by
hand with padding on both sides, and the sigmoid gradient."""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch
from trl.trainer.dpo_trainer import DPOTrainer

from clintune.methods.losses import completion_logps, dpo_loss, rpo_loss
from clintune.tokenization import IGNORE_INDEX

TOL = 1e-6
SEEDS = (0, 1, 2)
BATCH = 8


# --------------------------------------------------------------------------- TRL harness


class _FakeModel:
    """Stands in for the policy: returns, per row, the wanted summed log-prob spread over the
    row's completion positions (shifted by one, as a causal LM's next-token log-probs are)."""

    def __init__(self, row_logps: torch.Tensor, completion_mask: torch.Tensor):
        self.row_logps = row_logps
        self.completion_mask = completion_mask
        self.training = True
        self.calls = 0

    def __call__(self, *, input_ids, attention_mask, labels, fused_lm_head, use_cache, **kwargs):
        assert not kwargs, kwargs
        assert fused_lm_head is True and use_cache is False
        self.calls += 1
        shift_mask = self.completion_mask[:, 1:].to(torch.float64)
        # TRL's labels are the input ids outside the completion masked to -100.
        assert torch.equal(labels != -100, self.completion_mask.bool())
        # Uneven per-token split of each row's total, so no token carries the whole sum.
        weights = torch.arange(1, shift_mask.size(1) + 1, dtype=torch.float64) * shift_mask
        weights = weights / weights.sum(dim=1, keepdim=True)
        log_probs = weights * self.row_logps.unsqueeze(1)  # zeros outside the completion
        shape = log_probs.shape
        return types.SimpleNamespace(
            log_probs=log_probs,
            mean_logits=torch.zeros(shape, dtype=torch.float64),
            is_top1=torch.zeros(shape, dtype=torch.bool),
            entropy=torch.zeros(shape, dtype=torch.float64),
        )


def _identity(x):
    return x


def _stand_in_trainer(
    model: _FakeModel,
    *,
    beta: float,
    loss_type: str | list[str],
    label_smoothing: float,
    loss_weights: list[float] | None = None,
):
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    accelerator = types.SimpleNamespace(
        device=torch.device("cpu"),
        gather=_identity,
        gather_for_metrics=_identity,
        unwrap_model=_identity,
    )
    return types.SimpleNamespace(
        model=model,
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types),
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=0.05),
    )


def _layout(chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, generator):
    """input_ids / attention_mask / completion_mask for rows [chosen..., rejected...]:
    a prompt (>= 1 token, so position 0 is never completion), the completion, right padding."""
    lengths = torch.cat([chosen_lengths, rejected_lengths])
    prompt_lengths = torch.randint(1, 5, (lengths.numel(),), generator=generator)
    seq_len = int((prompt_lengths + lengths).max()) + 2
    input_ids = torch.zeros(lengths.numel(), seq_len, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    for row, (p, c) in enumerate(zip(prompt_lengths.tolist(), lengths.tolist(), strict=True)):
        input_ids[row, : p + c] = torch.randint(3, 50, (p + c,), generator=generator)
        attention_mask[row, : p + c] = 1
        completion_mask[row, p : p + c] = 1
    return input_ids, attention_mask, completion_mask


def trl_compute(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float,
    loss_type: str | list[str],
    label_smoothing: float,
    loss_weights: list[float] | None = None,
    seed: int = 0,
) -> tuple[float, dict[str, float]]:
    """TRL's batch-mean loss and its logged train metrics for this batch."""
    generator = torch.Generator().manual_seed(seed)
    input_ids, attention_mask, completion_mask = _layout(
        chosen_lengths, rejected_lengths, generator
    )
    model = _FakeModel(torch.cat([policy_chosen, policy_rejected]), completion_mask)
    trainer = _stand_in_trainer(
        model,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        loss_weights=loss_weights,
    )
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    assert model.calls == 1
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return float(loss), metrics


def _random_batch(seed: int, batch: int = BATCH):
    generator = torch.Generator().manual_seed(seed)

    def logps():
        return -50 * torch.rand(batch, generator=generator, dtype=torch.float64)

    chosen_lengths = torch.randint(1, 12, (batch,), generator=generator)
    rejected_lengths = torch.randint(1, 12, (batch,), generator=generator)
    return logps(), logps(), logps(), logps(), chosen_lengths, rejected_lengths


CASES = [
    ("sigmoid", 0.0),
    ("hinge", 0.0),
    ("hinge", 0.2),  # both ignore label smoothing for hinge
    ("ipo", 0.0),
    ("ipo", 0.2),  # and for IPO
    ("robust", 0.0),
    ("robust", 0.1),
    ("robust", 0.3),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize(("loss_type", "label_smoothing"), CASES)
def test_matches_trl(seed: int, beta: float, loss_type: str, label_smoothing: float) -> None:
    pc, pr, rc, rr, cl, rl = _random_batch(seed)
    kwargs = {"beta": beta, "loss_type": loss_type, "label_smoothing": label_smoothing}
    lengths = {"chosen_lengths": cl, "rejected_lengths": rl} if loss_type == "ipo" else {}
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, **kwargs, **lengths)
    assert losses.shape == chosen_rewards.shape == rejected_rewards.shape == (BATCH,)
    assert losses.dtype == torch.float64

    # The whole batch: TRL returns the mean loss and logs mean rewards.
    trl_loss, metrics = trl_compute(pc, pr, rc, rr, cl, rl, **kwargs, seed=seed)
    assert losses.mean().item() == pytest.approx(trl_loss, abs=TOL, rel=TOL)
    assert metrics["logps/chosen"] == pytest.approx(pc.mean().item(), abs=TOL)  # plumbing works
    assert metrics["logps/rejected"] == pytest.approx(pr.mean().item(), abs=TOL)
    assert metrics["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), abs=TOL)
    assert metrics["rewards/rejected"] == pytest.approx(rejected_rewards.mean().item(), abs=TOL)
    margins = (chosen_rewards - rejected_rewards).mean().item()
    accuracy = (chosen_rewards > rejected_rewards).double().mean().item()
    assert metrics["rewards/margins"] == pytest.approx(margins, abs=TOL)
    assert metrics["rewards/accuracies"] == pytest.approx(accuracy, abs=TOL)

    # Each example alone: per-example agreement of the loss and both rewards.
    for i in range(BATCH):
        one = [t[i : i + 1] for t in (pc, pr, rc, rr, cl, rl)]
        trl_loss_i, metrics_i = trl_compute(*one, **kwargs, seed=seed + i)
        assert losses[i].item() == pytest.approx(trl_loss_i, abs=TOL, rel=TOL)
        assert chosen_rewards[i].item() == pytest.approx(metrics_i["rewards/chosen"], abs=TOL)
        assert rejected_rewards[i].item() == pytest.approx(metrics_i["rewards/rejected"], abs=TOL)


def test_trl_stand_in_exercises_trl_code() -> None:
    pc, pr, rc, rr, cl, rl = _random_batch(7)
    common = {"loss_type": "sigmoid", "label_smoothing": 0.0}
    low, _ = trl_compute(pc, pr, rc, rr, cl, rl, beta=0.1, **common)
    high, _ = trl_compute(pc, pr, rc, rr, cl, rl, beta=0.5, **common)
    assert abs(low - high) > 1e-3
    # The policy log-probs reach the loss through the fake model's per-token output.
    shifted, _ = trl_compute(pc + 5.0, pr, rc, rr, cl, rl, beta=0.1, **common)
    assert shifted < low
    # IPO's normalisation really uses the completion lengths we laid out.
    ipo = {"beta": 0.1, "loss_type": "ipo", "label_smoothing": 0.0}
    ipo_a, _ = trl_compute(pc, pr, rc, rr, cl, rl, **ipo)
    ipo_b, _ = trl_compute(pc, pr, rc, rr, cl + 3, rl, **ipo)
    assert abs(ipo_a - ipo_b) > 1e-6
    unnormalised = dpo_loss(pc, pr, rc, rr, **ipo)[0].mean().item()
    assert abs(unnormalised - ipo_a) > 1e-3
    # An unknown loss type reaches TRL's own dispatch and is rejected there.
    with pytest.raises(ValueError, match="Unknown loss type"):
        trl_compute(pc, pr, rc, rr, cl, rl, beta=0.1, loss_type="nope", label_smoothing=0.0)


def test_hinge_cases_cover_both_sides_of_the_kink() -> None:
    losses = torch.cat(
        [dpo_loss(*_random_batch(seed)[:4], beta=0.1, loss_type="hinge")[0] for seed in SEEDS]
    )
    assert (losses == 0).any() and (losses > 0).any()


# --------------------------------------------------------------------------- RPO


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("beta", "nll_alpha"), [(0.1, 1.0), (0.5, 0.3)])
def test_rpo_matches_trl_sigmoid_plus_sft(seed: int, beta: float, nll_alpha: float) -> None:
    """RPO is TRL's ``loss_type=["sigmoid", "sft"]`` with ``loss_weights=[1, alpha]``; its
    "sft" term is the token-weighted NLL of the batch's chosen completions."""
    pc, pr, rc, rr, cl, rl = _random_batch(seed)
    assert not torch.equal(cl, rl) and cl.unique().numel() > 1  # lengths matter here
    trl = {
        "beta": beta,
        "loss_type": ["sigmoid", "sft"],
        "label_smoothing": 0.0,
        "loss_weights": [1.0, nll_alpha],
    }
    trl_loss, metrics = trl_compute(pc, pr, rc, rr, cl, rl, **trl, seed=seed)
    losses, chosen_rewards, rejected_rewards = rpo_loss(
        pc, pr, rc, rr, chosen_lengths=cl, beta=beta, nll_alpha=nll_alpha, nll_num_tokens=cl.sum()
    )
    assert losses.shape == (BATCH,) and losses.dtype == torch.float64
    assert losses.mean().item() == pytest.approx(trl_loss, abs=TOL, rel=TOL)
    assert metrics["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), abs=TOL)
    assert metrics["rewards/rejected"] == pytest.approx(rejected_rewards.mean().item(), abs=TOL)
    # The NLL term really is in play: plain DPO gives another loss.
    plain = dpo_loss(pc, pr, rc, rr, beta=beta)[0].mean().item()
    assert abs(plain - trl_loss) > 1e-2

    # Each pair alone: the default (per-example mean) NLL is TRL's for a batch of one.
    per_example, _, _ = rpo_loss(pc, pr, rc, rr, chosen_lengths=cl, beta=beta, nll_alpha=nll_alpha)
    for i in range(BATCH):
        one = [t[i : i + 1] for t in (pc, pr, rc, rr, cl, rl)]
        trl_loss_i, _ = trl_compute(*one, **trl, seed=seed + i)
        assert per_example[i].item() == pytest.approx(trl_loss_i, abs=TOL, rel=TOL)


def test_rpo_rejects_a_negative_alpha() -> None:
    pc, pr, rc, rr, cl, _ = _random_batch(0)
    with pytest.raises(ValueError, match="nll_alpha"):
        rpo_loss(pc, pr, rc, rr, chosen_lengths=cl, nll_alpha=-0.1)


# --------------------------------------------------------------------------- cDPO and validation


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("epsilon", [0.1, 0.25, 0.4])
def test_conservative_dpo_closed_form(seed: int, epsilon: float) -> None:
    pc, pr, rc, rr, cl, rl = _random_batch(seed)
    beta = 0.1
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=epsilon)
    delta = (pc - rc) - (pr - rr)
    expected = [
        -(1 - epsilon) * math.log(1 / (1 + math.exp(-beta * d)))
        - epsilon * math.log(1 / (1 + math.exp(beta * d)))
        for d in delta.tolist()
    ]
    torch.testing.assert_close(
        losses, torch.tensor(expected, dtype=torch.float64), atol=1e-9, rtol=0
    )

    plain, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=0.0)
    assert (losses - plain).abs().max() > 1e-3
    trl_loss, _ = trl_compute(
        pc, pr, rc, rr, cl, rl, beta=beta, loss_type="sigmoid", label_smoothing=0.0
    )
    assert plain.mean().item() == pytest.approx(trl_loss, abs=TOL, rel=TOL)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_type": "nope"}, "loss_type"),
        ({"label_smoothing": 0.5}, "label_smoothing"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing"),
        ({"beta": 0.0}, "beta"),
        ({"beta": -0.1}, "beta"),
        ({"loss_type": "ipo", "chosen_lengths": torch.tensor([3, 4])}, "lengths"),
        ({"loss_type": "ipo", "rejected_lengths": torch.tensor([3, 4])}, "lengths"),
    ],
)
def test_invalid_inputs_raise(kwargs: dict, match: str) -> None:
    logps = torch.tensor([-3.0, -4.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        dpo_loss(logps, logps - 1, logps, logps, **kwargs)


# --------------------------------------------------------------------------- completion_logps


def test_completion_logps_by_hand_with_padding_on_both_sides() -> None:
    vocab, seq = 5, 7
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, seq, vocab, generator=generator, dtype=torch.float64)
    pad = IGNORE_INDEX
    # Row 0: positions 0-1 left padding, 2-3 prompt, 4-5 completion (tokens 1, 3), 6 right pad.
    # Row 1: position 0 left padding, 1 prompt, 2-4 completion (tokens 4, 0, 2), 5-6 right pad.
    labels = torch.tensor(
        [
            [pad, pad, pad, pad, 1, 3, pad],
            [pad, pad, 4, 0, 2, pad, pad],
        ]
    )

    def log_p(row: int, position: int, token: int) -> float:
        return torch.log_softmax(logits[row, position], dim=-1)[token].item()

    # Logits at position t predict the token at t + 1:
    # row 0: token 1 at position 4 <- logits[0, 3]; token 3 at position 5 <- logits[0, 4].
    expected_0 = log_p(0, 3, 1) + log_p(0, 4, 3)
    # row 1: token 4 at 2 <- logits[1, 1]; token 0 at 3 <- logits[1, 2];
    #        token 2 at 4 <- logits[1, 3].
    expected_1 = log_p(1, 1, 4) + log_p(1, 2, 0) + log_p(1, 3, 2)

    result = completion_logps(logits, labels)
    assert result.dtype == torch.float64 and result.shape == (2,)
    torch.testing.assert_close(
        result, torch.tensor([expected_0, expected_1], dtype=torch.float64), atol=1e-12, rtol=0
    )

    # Logits at positions that predict no completion token do not matter.
    perturbed = logits.clone()
    perturbed[0, [0, 1, 2, 5, 6]] += 10 * torch.randn(5, vocab, dtype=torch.float64)
    perturbed[1, [0, 4, 5, 6]] += 10 * torch.randn(4, vocab, dtype=torch.float64)
    torch.testing.assert_close(completion_logps(perturbed, labels), result, atol=1e-12, rtol=0)

    # ... while those that do, do.
    for row, position in [(0, 3), (0, 4), (1, 1), (1, 2), (1, 3)]:
        changed = logits.clone()
        changed[row, position, labels[row, position + 1]] += 1.0
        assert not torch.isclose(completion_logps(changed, labels)[row], result[row])


# --------------------------------------------------------------------------- gradient


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_sigmoid_gradient_by_hand(beta: float) -> None:
    pc, pr, rc, rr, _, _ = _random_batch(3)
    pc = pc.clone().requires_grad_(True)
    pr = pr.clone().requires_grad_(True)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    losses.sum().backward()
    delta = (pc - rc - (pr - rr)).detach()
    expected = -beta * torch.sigmoid(-beta * delta)
    torch.testing.assert_close(pc.grad, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(pr.grad, -expected, atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- logits/* vs TRL

LOGITS_PAIRS = [
    ("Criteria met? dysuria, nitrite positive", "yes", "no"),
    ("Criteria met? " + "cough and fever, urinalysis negative. " * 3, "no", "yes, they are met"),
    ("Hi", "provider: nurse; urgency: routine", "no"),
]


@pytest.mark.parametrize("share_prompt", [False, True])
def test_logits_metrics_match_trl_on_the_same_batch(tiny_models, share_prompt: bool) -> None:
    """``logits/chosen`` and ``logits/rejected`` by TRL 1.16's own definition: its fused LM
    head's per-token mean logit (over the vocabulary), averaged over all completion tokens of
    the batch's chosen (rejected) rows. TRL's ``_compute_loss`` runs on the same tiny model
    and batch, its metrics collected by the stand-in trainer above."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from clintune.methods.dpo import DPOModule
    from clintune.tokenization import collate_pairs, collate_pairs_shared_prompt, encode_pair

    loaded = tiny_models["tiny_llama"]
    tokenizer, pad = loaded.tokenizer, loaded.tokenizer.pad_token_id
    pairs = [
        encode_pair(tokenizer, [{"role": "user", "content": prompt}], chosen, rejected, 256)
        for prompt, chosen, rejected in LOGITS_PAIRS
    ]
    concatenated = collate_pairs(pairs, pad)
    zeros = torch.zeros(len(pairs))

    def fresh_model() -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(loaded.source, dtype=torch.float32)
        return model.eval()

    ours = DPOModule(fresh_model(), learning_rate=1e-3).eval()
    batch = collate_pairs_shared_prompt(pairs, pad) if share_prompt else concatenated
    with torch.no_grad():
        metrics = ours.pair_losses(
            {**batch, "ref_chosen_logps": zeros, "ref_rejected_logps": zeros}
        )

    trl_model = fresh_model()
    add_fused_lm_head(trl_model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    trainer = _stand_in_trainer(trl_model, beta=0.1, loss_type="sigmoid", label_smoothing=0.0)
    completion_mask = (concatenated["labels"] != IGNORE_INDEX).long()
    inputs = {
        "input_ids": concatenated["input_ids"],
        "attention_mask": concatenated["attention_mask"],
        "completion_mask": completion_mask,
        "ref_chosen_logps": zeros,
        "ref_rejected_logps": zeros,
    }
    with torch.no_grad():
        DPOTrainer._compute_loss(trainer, trl_model, inputs, return_outputs=False)
    trl = {name: values[-1] for name, values in trainer._metrics["eval"].items()}

    # The same log-probs first: both sides really scored the same completions.
    assert float(metrics["logps/chosen"].mean()) == pytest.approx(trl["logps/chosen"], abs=1e-4)
    for name in ("logits/chosen", "logits/rejected"):
        # The random tiny model's mean logits are small (~5e-3): a relative tolerance.
        assert float(metrics[name]) == pytest.approx(trl[name], rel=1e-5, abs=1e-9), name
    # The two metrics differ here, so a swap of chosen and rejected would fail.
    assert abs(trl["logits/chosen"] - trl["logits/rejected"]) > 1e-4
