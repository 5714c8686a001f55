"""Log-probabilities without full-vocabulary logits.

At Llama-3's 128,256-token vocabulary a ``[rows × positions × vocabulary]`` float32 logits
tensor dominates memory (8 pairs of 2,048 tokens: about 17 GB, before log-softmax copies it),
and SFT spends most of its time on ``lm_head`` over prompt positions whose logits it throws
away. So the decoder runs up to its last hidden state, only the positions whose next token is
scored are kept, and ``lm_head`` plus log-softmax run over those in chunks of positions: no
float32 tensor larger than ``chunk_size × vocabulary`` exists, in the forward pass or (through
a custom autograd function that recomputes each chunk) in the backward pass; only a batch small
enough that its probabilities fit in ``KEEP_PROBABILITIES_MAX_ELEMENTS`` keeps them instead.

The full-logits functions in ``losses.py`` stay as the reference these are tested against."""

from __future__ import annotations

from typing import Any

import torch

#: Positions per chunk: 1,024 × 128,256 float32 logits are 0.5 GB.
DEFAULT_CHUNK_SIZE = 1024
#: Up to this many (positions × vocabulary) probabilities are kept from the forward pass for
#: the backward pass (16 MiB in float32: 512 positions at an 8k vocabulary), instead of
#: recomputing them chunk by chunk; beyond it (at Llama 3's vocabulary, more than 32 scored
#: positions) they are recomputed, so memory stays at one chunk.
KEEP_PROBABILITIES_MAX_ELEMENTS = 4 * 1024 * 1024


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Softmax in half precision loses the small probabilities that log-likelihoods sum over.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _ChunkedTokenLogps(torch.autograd.Function):
    """log p(target) = logit[target] − logsumexp(logits), chunk by chunk. The backward pass
    recomputes each chunk's logits (or reuses the probabilities kept by a small forward pass):
    d log p / d logits = onehot(target) − softmax(logits)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_size: int,
    ) -> torch.Tensor:
        dtype = _compute_dtype(hidden.dtype)
        logps = torch.empty(hidden.size(0), dtype=dtype, device=hidden.device)
        lse = torch.empty_like(logps)
        # Small enough to keep: backward then reuses the probabilities instead of running the
        # head's matmul again (at an 8k vocabulary the recompute cost ~5% of a DPO step).
        keep = hidden.size(0) * weight.size(0) <= KEEP_PROBABILITIES_MAX_ELEMENTS and (
            hidden.requires_grad or weight.requires_grad
        )
        probabilities = (
            torch.empty(hidden.size(0), weight.size(0), dtype=dtype, device=hidden.device)
            if keep
            else None
        )
        for start in range(0, hidden.size(0), chunk_size):
            stop = start + chunk_size
            logits = (hidden[start:stop] @ weight.t()).to(dtype)
            lse[start:stop] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, targets[start:stop, None]).squeeze(1)
            logps[start:stop] = picked - lse[start:stop]
            if probabilities is not None:
                torch.exp(logits - lse[start:stop, None], out=probabilities[start:stop])
        ctx.save_for_backward(hidden, weight, targets, lse, probabilities)
        ctx.chunk_size = chunk_size
        return logps

    @staticmethod
    def backward(ctx: Any, grad_logps: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        hidden, weight, targets, lse, probabilities = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=lse.dtype) if need_weight else None
        dtype = lse.dtype
        for start in range(0, hidden.size(0), ctx.chunk_size):
            stop = start + ctx.chunk_size
            chunk = hidden[start:stop]
            # −softmax · g, plus g at the target: the gradient of g · log p w.r.t. the logits.
            if probabilities is None:
                logits = (chunk @ weight.t()).to(dtype)
                softmax = torch.exp(logits - lse[start:stop, None])
                grad_logits = softmax.mul_(-grad_logps[start:stop, None])
            else:
                grad_logits = probabilities[start:stop] * -grad_logps[start:stop, None]
            grad_logits.scatter_add_(
                1, targets[start:stop, None], grad_logps[start:stop, None].to(dtype)
            )
            if grad_hidden is not None:
                grad_hidden[start:stop] = (grad_logits @ weight.to(dtype)).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ chunk.to(dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def chunked_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """``log softmax(hidden @ weightᵀ)[target]`` for each row of ``hidden`` ([N, H]), with
    targets [N] and the LM head's weight [V, H]; in at least float32."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if hidden.size(0) == 0:
        return hidden.new_zeros(0, dtype=_compute_dtype(hidden.dtype))
    return _ChunkedTokenLogps.apply(hidden, weight, targets, int(chunk_size))


def mean_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each row's logit averaged over the vocabulary (TRL's ``logits/*`` metrics), without the
    logits: mean_v(h · w_v) = h · mean_v(w_v)."""
    with torch.no_grad():
        dtype = _compute_dtype(hidden.dtype)
        return hidden.detach().to(dtype) @ weight.detach().to(dtype).mean(0)


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The decoder (up to the last hidden state) and the LM head of a causal LM, through a
    peft wrapper when there is one (its LoRA layers sit inside the decoder)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("LM heads with a bias are not supported by the chunked log-probs")
    return base.get_decoder(), head


def scored_positions(
    hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hidden states [N, H] that predict a scored token, those tokens [N], and the row each
    came from [N]: only these go through the LM head."""
    rows = torch.nonzero(mask, as_tuple=True)[0]
    return hidden[mask], targets[mask], rows


def sequence_token_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probs of the completion tokens [N], their rows [N], their hidden states [N, H])
    of a batch laid out as prompt + completion with ``labels`` = IGNORE_INDEX on the prompt."""
    from clintune.tokenization import IGNORE_INDEX

    decoder, head = decoder_and_head(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    # Position t predicts token t + 1.
    targets = labels[:, 1:]
    selected, tokens, rows = scored_positions(hidden[:, :-1], targets, targets != IGNORE_INDEX)
    return chunked_token_logps(selected, head.weight, tokens, chunk_size), rows, selected


def sum_by_row(values: torch.Tensor, rows: torch.Tensor, count: int) -> torch.Tensor:
    return values.new_zeros(count).index_add(0, rows, values)
