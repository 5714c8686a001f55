"""Direct preference optimisation, from the SFT weights (the study's SFT→DPO), and what
every preference method shares (``PreferenceModule``).

One forward pass scores chosen and rejected completions together; the loss is
``losses.dpo_loss`` (``losses.rpo_loss`` with an NLL weight); metrics carry TRL's names so
W&B panels line up with TRL runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch

from clintune.methods.logprobs import (
    DEFAULT_CHUNK_SIZE,
    chunked_token_logps,
    decoder_and_head,
    mean_logits,
    scored_positions,
    sequence_token_logps,
    sum_by_row,
)
from clintune.methods.losses import DPO_LOSS_TYPES, dpo_loss, rpo_loss
from clintune.methods.optim import ComputeCounters, ShardableModel, WarmupCosineAdamW
from clintune.sharding import call_in_root_forward

REFERENCE_MODES = ("precompute", "adapter_disabled", "copy")


@dataclass
class PairForward:
    """What one forward pass over a batch of pairs yields, rows = chosen then rejected."""

    logps: torch.Tensor  # [2B] summed completion log-probs
    lengths: torch.Tensor  # [2B] completion tokens
    logit_sums: torch.Tensor  # [2B] sum over completion tokens of the vocabulary-mean logit
    tokens: int  # non-padding tokens processed


PairTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # logps, lengths, logit_sums


def _per_row(
    logps: torch.Tensor,
    rows: torch.Tensor,
    selected: torch.Tensor,
    head_weight: torch.Tensor,
    count: int,
) -> PairTensors:
    lengths = torch.bincount(rows, minlength=count)
    logit_sums = sum_by_row(mean_logits(selected, head_weight), rows, count)
    return sum_by_row(logps, rows, count), lengths, logit_sums


def _concatenated_forward(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int
) -> PairTensors:
    logps, rows, selected = sequence_token_logps(
        model, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk_size
    )
    _, head = decoder_and_head(model)
    return _per_row(logps, rows, selected, head.weight, batch["input_ids"].size(0))


def _shared_prompt_forward(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int
) -> PairTensors:
    """The prompt runs once; its key/value cache (with gradients) is tiled for the chosen and
    the rejected completion. Same log-probs as the concatenated pass, at about half the cost
    when prompts are much longer than answers, as in clinical tasks."""
    decoder, head = decoder_and_head(model)
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
    completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
    pairs = prompt_ids.size(0)
    prompt_positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    prompt_out = decoder(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=prompt_positions,
        use_cache=True,
    )
    cache = prompt_out.cache
    tiled = torch.arange(pairs, device=prompt_ids.device).repeat(2)
    cache.batch_select_indices(tiled)
    prompt_lengths = prompt_mask.sum(-1)[tiled]
    steps = torch.arange(completion_ids.size(1), device=prompt_ids.device)
    completion_out = decoder(
        input_ids=completion_ids,
        attention_mask=torch.cat([prompt_mask[tiled], completion_mask], dim=1),
        position_ids=prompt_lengths[:, None] + steps[None, :],
        cache=cache,
        use_cache=True,
    )
    # Completion token j is predicted by the position before it: the prompt's last position
    # (prompts are left-padded) for j = 0, then the completion's own positions.
    hidden = torch.cat(
        [
            # The last position before tiling: indexing the whole prompt's states by
            # ``tiled`` would copy them (and scatter their gradient back) for one position.
            prompt_out.last_hidden_state[:, -1:, :][tiled],
            completion_out.last_hidden_state[:, :-1, :],
        ],
        dim=1,
    )
    selected, targets, rows = scored_positions(hidden, completion_ids, completion_mask.bool())
    logps = chunked_token_logps(selected, head.weight, targets, chunk_size)
    return _per_row(logps, rows, selected, head.weight, 2 * pairs)


# What the forward pass reads of a batch, in either layout (not the reference log-probs).
_CONCATENATED = ("input_ids", "attention_mask", "labels")
_SHARED_PROMPT = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")


def _pair_tensors(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int
) -> PairTensors:
    if "prompt_ids" in batch:
        return _shared_prompt_forward(model, batch, chunk_size)
    return _concatenated_forward(model, batch, chunk_size)


def pair_forward(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> PairForward:
    """Log-probs of both completions of every pair, by whichever layout the batch uses; for a
    sharded model inside the root's forward, where its LM head is gathered."""
    keys = _SHARED_PROMPT if "prompt_ids" in batch else _CONCATENATED
    inputs = {key: batch[key] for key in keys}
    logps, lengths, logit_sums = call_in_root_forward(model, _pair_tensors, inputs, chunk_size)
    masks = ("prompt_mask", "completion_mask") if "prompt_ids" in batch else ("attention_mask",)
    tokens = sum(int(batch[mask].sum()) for mask in masks)
    return PairForward(logps=logps, lengths=lengths, logit_sums=logit_sums, tokens=tokens)


def sequence_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row summed completion log-probs, per-row completion lengths) of a batch."""
    out = pair_forward(model, batch, chunk_size)
    return out.logps, out.lengths


@contextlib.contextmanager
def adapter_disabled(model: torch.nn.Module) -> Iterator[None]:
    if not hasattr(model, "disable_adapter"):
        raise ValueError(
            "method.reference=adapter_disabled needs a LoRA policy (model.lora.enabled=true)"
        )
    with model.disable_adapter():
        yield


class PreferenceModule(ComputeCounters, WarmupCosineAdamW, ShardableModel, L.LightningModule):
    """What every preference method's module shares: batches of pairs (chosen rows then
    rejected rows, ``tokenization.collate_pairs`` or the shared-prompt layout), one forward
    pass over both, the reference log-probs (``precompute``: in the batch; ``adapter_disabled``;
    ``copy``; None: reference-free), token accounting, the NaN guard and logging under TRL's
    names. A method implements ``losses_and_metrics`` (per-example ``losses`` and what it
    logs) and, where TRL logs something else than DPO's set, ``logged_values``."""

    #: how the method's losses are named in the NaN message
    METHOD = "preference"

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        learning_rate: float,
        reference: str | None = None,
        reference_model: torch.nn.Module | None = None,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        logits_chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__()
        if reference is not None and reference not in REFERENCE_MODES:
            raise ValueError(
                f"method.reference must be one of {REFERENCE_MODES}, got {reference!r}"
            )
        if reference == "copy" and reference_model is None:
            raise ValueError("method.reference=copy needs the frozen reference model")
        self.model = model.train()
        self.reference = reference
        # Kept out of the module tree so the optimiser, checkpoints and .train() ignore it.
        self._reference_model = (
            [reference_model.eval().requires_grad_(False)] if reference_model else []
        )
        self.learning_rate = float(learning_rate)
        self.weight_decay = float(weight_decay)
        self.warmup_ratio = float(warmup_ratio)
        self.betas = tuple(betas)
        self.logits_chunk_size = int(logits_chunk_size)

    def frozen_models(self) -> list[torch.nn.Module]:
        # The reference copy is sharded like the policy (FSDP), but not trained.
        return list(self._reference_model)

    def on_fit_start(self) -> None:
        for reference in self._reference_model:
            reference.to(self.device)

    def _reference_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference is None:
            raise ValueError(f"{type(self).__name__} is reference-free")
        if self.reference == "precompute":
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        with torch.no_grad():
            if self.reference == "copy":
                out = pair_forward(self._reference_model[0], batch, self.logits_chunk_size)
            else:
                with adapter_disabled(self.model):
                    out = pair_forward(self.model, batch, self.logits_chunk_size)
        if self.training:
            self.reference_tokens += out.tokens
        return out.logps.chunk(2)

    def _world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def _sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over data-parallel ranks (every rank must call this alike)."""
        if self._world_size() > 1:
            return self.trainer.strategy.reduce(value, reduce_op="sum")
        return value

    def nll_num_tokens(self, chosen_lengths: torch.Tensor) -> torch.Tensor:
        """Denominator of a chosen-NLL term: this batch's chosen tokens, or under data
        parallelism the global batch's divided by the world size, as SFT normalises. In
        validation too (every rank runs the same number of batches): with a rank's own count
        there, two processes' eval/loss would differ from one process's on the same batches."""
        tokens = chosen_lengths.sum().to(torch.float64)
        world = self._world_size()
        if world > 1:
            tokens = self._sum_over_ranks(tokens) / world
        return tokens

    def losses_and_metrics(
        self, out: PairForward, batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def pair_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-example losses and everything TRL logs about them."""
        out = pair_forward(self.model, batch, self.logits_chunk_size)
        self._last_tokens = out.tokens
        metrics = self.losses_and_metrics(out, batch)
        chosen_logit_sums, rejected_logit_sums = out.logit_sums.chunk(2)
        chosen_lengths, rejected_lengths = out.lengths.chunk(2)
        # Token-weighted over the batch, as TRL computes them.
        metrics.setdefault(
            "logits/chosen", chosen_logit_sums.sum() / chosen_lengths.sum().clamp(min=1)
        )
        metrics.setdefault(
            "logits/rejected", rejected_logit_sums.sum() / rejected_lengths.sum().clamp(min=1)
        )
        return metrics

    def logged_values(self, out: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, int]]:
        """(value, examples it averages) per metric name: TRL's paired-preference set."""
        pairs = out["losses"].size(0)
        chosen, rejected = out["rewards/chosen"], out["rewards/rejected"]
        values = {
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "logps/chosen": out["logps/chosen"].mean(),
            "logps/rejected": out["logps/rejected"].mean(),
            "logits/chosen": out["logits/chosen"],
            "logits/rejected": out["logits/rejected"],
        }
        values.update({name: out[name] for name in self.EXTRA_METRICS})
        return {name: (value, pairs) for name, value in values.items()}

    #: scalar metrics a method adds to the paired set (e.g. ORPO's ``nll_loss``)
    EXTRA_METRICS: tuple[str, ...] = ()
    #: logged values averaged over ranks by Lightning (else ``logged_values`` did it already)
    SYNC_LOGGED = True

    def _log(self, prefix: str, out: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        examples = out["losses"].size(0)
        # The loss averaged over ranks, as TRL gathers it: the global batch's value.
        self.log(f"{prefix}/loss", loss, batch_size=examples, sync_dist=True, prog_bar=True)
        for name, (value, count) in self.logged_values(out).items():
            self.log(
                f"{prefix}/{name}",
                value,
                batch_size=max(int(count), 1),
                sync_dist=self.SYNC_LOGGED,
                prog_bar=name == "rewards/accuracies",
            )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.pair_losses(batch)
        loss = out["losses"].mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{self.METHOD} loss is {loss.item()} at global step {self.global_step} (batch "
                f"{batch_idx}); stopping with the last good checkpoint intact. Lower "
                "method.module.learning_rate or beta, or check the precision setting."
            )
        masks = [
            v for k, v in batch.items() if k in ("attention_mask", "prompt_mask", "completion_mask")
        ]
        real = sum(int(m.sum()) for m in masks)
        self.tokens_trained += real
        self.padding_tokens_trained += sum(m.numel() for m in masks) - real
        self._log("train", out, loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.pair_losses(batch)
        self._log("eval", out, out["losses"].mean())


class DPOModule(PreferenceModule):
    """DPO, and RPO when ``nll_alpha`` > 0. Batches hold, for ``reference=precompute``,
    ``ref_chosen_logps``/``ref_rejected_logps``."""

    METHOD = "DPO"

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        learning_rate: float,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        nll_alpha: float = 0.0,
        reference: str = "precompute",
        **kwargs: Any,
    ) -> None:
        if loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"method.module.loss_type must be one of {DPO_LOSS_TYPES}")
        if reference is None:
            raise ValueError(f"method.reference must be one of {REFERENCE_MODES}, got None")
        super().__init__(model, learning_rate=learning_rate, reference=reference, **kwargs)
        self.beta = float(beta)
        self.loss_type = loss_type
        self.label_smoothing = float(label_smoothing)
        self.nll_alpha = float(nll_alpha)
        if self.nll_alpha > 0:
            self.METHOD = "RPO"
            self.EXTRA_METRICS = ("nll_loss",)

    def losses_and_metrics(
        self, out: PairForward, batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        chosen_logps, rejected_logps = out.logps.chunk(2)
        chosen_lengths, rejected_lengths = out.lengths.chunk(2)
        ref_chosen, ref_rejected = self._reference_logps(batch)
        common = {
            "beta": self.beta,
            "loss_type": self.loss_type,
            "label_smoothing": self.label_smoothing,
            "chosen_lengths": chosen_lengths,
            "rejected_lengths": rejected_lengths,
        }
        reference = (ref_chosen.to(chosen_logps.dtype), ref_rejected.to(rejected_logps.dtype))
        metrics: dict[str, torch.Tensor] = {}
        if self.nll_alpha > 0:
            nll_tokens = self.nll_num_tokens(chosen_lengths)
            losses, chosen_rewards, rejected_rewards = rpo_loss(
                chosen_logps,
                rejected_logps,
                *reference,
                nll_alpha=self.nll_alpha,
                nll_num_tokens=nll_tokens,
                **common,
            )
            metrics["nll_loss"] = -chosen_logps.detach().sum() / nll_tokens
        else:
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                chosen_logps, rejected_logps, *reference, **common
            )
        return {
            "losses": losses,
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "logps/chosen": chosen_logps.detach(),
            "logps/rejected": rejected_logps.detach(),
            **metrics,
        }


@torch.no_grad()
def precompute_reference_logps(
    model: torch.nn.Module,
    batches: Iterator[dict[str, torch.Tensor]] | list,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Reference log-probs of every pair, in loader order: (chosen, rejected, tokens).

    The global random generator is left as it was: iterating a DataLoader without its own
    generator draws a seed from it, and the pass is skipped when its result is cached, so
    otherwise training (dropout, e.g. LoRA's) would draw other numbers after a cache miss than
    after a hit, and the same command would end with different weights."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chosen, rejected, tokens = [], [], 0
    # CPU only: the loader's draw is on the CPU, and the pass in eval mode draws nothing else.
    with torch.random.fork_rng(devices=[]):
        for batch in batches:
            batch = {key: value.to(device) for key, value in batch.items()}
            out = pair_forward(model, batch, chunk_size)
            first, second = out.logps.chunk(2)
            chosen.append(first.float().cpu())
            rejected.append(second.float().cpu())
            tokens += out.tokens
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected), tokens
