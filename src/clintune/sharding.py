"""FSDP2, the sharded path: ``trainer=fsdp`` on GPUs, ``trainer=fsdp_cpu`` on two gloo
processes on CPU (the same code, which is how CI runs it).

The plan: every decoder layer is its own FSDP unit (``fully_shard``), then the root, the
whole causal LM, whose own unit holds what is left: the embeddings, the final norm and the
LM head. Lightning's ``ModelParallelStrategy`` runs it; each method's LightningModule applies
the plan in ``configure_model`` (:class:`clintune.methods.optim.ShardableModel`).

Outside a forward call, a sharded parameter is a DTensor holding this rank's rows only. The
chunked log-probs (``methods/logprobs.py``) read the decoder's hidden states and the LM head's
weight themselves instead of calling the model's ``forward``, so they run inside
:func:`call_in_root_forward`: FSDP's own forward hooks around a method of the root gather the
root's parameters first, and route the LM head's gradient back through its reduce-scatter.

Saving: rank zero gathers the full weights into an ordinary Hugging Face directory
(:func:`full_state_dict`); training checkpoints stay sharded (torch.distributed.checkpoint,
one file per rank) and are published atomically (:meth:`ShardedStrategy.save_checkpoint`)."""

from __future__ import annotations

import os
import shutil
import types
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)

from clintune.errors import UserError
from clintune.settings import FSDPSettings

ROOT_CALL = "clintune_root_call"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAVED_DTYPES = "_clintune_saved_dtypes"


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else _DTYPES[name]


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a causal LM (through a peft wrapper): the units of sharding."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(base.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(base).__name__} has no decoder layers to shard")
    return list(layers)


def _root_call(self: torch.nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(self, *args, **kwargs)


def call_in_root_forward(model: torch.nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(model, *args)``; for a sharded model, inside the root's forward hooks (its
    parameters gathered, their gradients reduce-scattered in backward). ``fn`` must return
    tensors (or tuples of them): FSDP hooks its backward pass on those."""
    if isinstance(model, FSDPModule):
        return getattr(model, ROOT_CALL)(fn, *args)
    return fn(model, *args)


def _to_trainable_dtype(
    module: torch.nn.Module, dtype: torch.dtype, names: dict[int, str], saved: dict[str, Any]
) -> None:
    """Trainable parameters in ``dtype`` (the optimiser's master copy), recording what they
    were (by name in the whole model) so that saved weights come out in the dtype they were
    loaded in."""
    for parameter in module.parameters():
        if parameter.requires_grad and parameter.dtype != dtype:
            saved[names[id(parameter)]] = parameter.dtype
            parameter.data = parameter.data.to(dtype)


def shard_causal_lm(
    model: torch.nn.Module, mesh: Any, plan: FSDPSettings, *, frozen: bool = False
) -> None:
    """Applies the plan to ``model`` in place: each decoder layer, then the root. ``frozen``:
    a model that is never trained (the DPO reference copy): no checkpointing, no upcast.
    Idempotent, since Lightning calls ``configure_model`` at every fit."""
    if isinstance(model, FSDPModule):
        return
    if plan.activation_checkpointing and not frozen:
        from clintune.models.loading import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    policy = MixedPrecisionPolicy(
        param_dtype=_dtype(plan.param_dtype), reduce_dtype=_dtype(plan.reduce_dtype)
    )
    trainable_dtype = _DTYPES[plan.trainable_dtype]
    # Named before sharding: fully_shard replaces the parameter objects (by DTensors).
    names = {id(p): name for name, p in model.named_parameters()}
    upcast: dict[str, torch.dtype] = {}
    # Unit by unit, so that at most one layer exists in full in the upcast dtype at a time.
    for layer in decoder_layers(model):
        if not frozen:
            _to_trainable_dtype(layer, trainable_dtype, names, upcast)
        fully_shard(
            layer, mesh=mesh, mp_policy=policy, reshard_after_forward=plan.reshard_after_forward
        )
    if not frozen:
        _to_trainable_dtype(model, trainable_dtype, names, upcast)
    # A trained root keeps its parameters gathered after forward (backward needs them at
    # once, and reshards them after); a frozen one has no backward, so it reshards at once.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True if frozen else None)
    setattr(model, _SAVED_DTYPES, upcast)
    setattr(model, ROOT_CALL, types.MethodType(_root_call, model))
    register_fsdp_forward_method(model, ROOT_CALL)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full weights of a sharded model on rank zero's CPU (empty elsewhere), in the dtype
    each was loaded in. Every rank must call it: the shards are gathered."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    saved = getattr(model, _SAVED_DTYPES, {})
    return {name: value.to(saved.get(name, value.dtype)) for name, value in state.items()}


class ShardedStrategy(ModelParallelStrategy):
    """Lightning's FSDP2 strategy, data-parallel over every process, carrying the sharding
    plan the LightningModule applies, with sharded training checkpoints published atomically:
    each is written to a fresh directory, then ``last.ckpt`` (a symbolic link) is replaced in
    one rename, so a kill mid-save leaves the previous checkpoint whole."""

    def __init__(self, plan: FSDPSettings) -> None:
        super().__init__(
            data_parallel_size=plan.data_parallel_size,
            tensor_parallel_size=plan.tensor_parallel_size,
            save_distributed_checkpoint=True,
        )
        self.plan = plan

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            # Lightning's "auto" is the number of nodes (for 2-D parallelism); here every
            # process is a data-parallel rank.
            self._data_parallel_size = len(self.parallel_devices or []) * self.num_nodes
        super().setup_environment()

    def shard(self, model: torch.nn.Module, *, frozen: bool = False) -> None:
        shard_causal_lm(model, self.device_mesh["data_parallel"], self.plan, frozen=frozen)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        link = Path(self.broadcast(str(filepath)))
        version = self.broadcast(f"{link.name}.{uuid.uuid4().hex[:12]}")
        target = link.with_name(version)
        super().save_checkpoint(checkpoint, target, storage_options)
        self.barrier()
        if self.global_rank == 0:
            _publish_checkpoint(link, target)
        self.barrier()


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _publish_checkpoint(link: Path, target: Path) -> None:
    """Points ``link`` at the complete checkpoint directory ``target`` in one rename, then
    removes every other version (the previous one, any left by a killed save)."""
    for path in target.iterdir():
        if path.is_file():
            _fsync(path)  # torch.distributed.checkpoint syncs its own files; the metadata too
    _fsync(target)
    staging = link.with_name(target.name + ".link")
    os.symlink(target.name, staging)
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)  # not a version of ours
    os.replace(staging, link)
    _fsync(link.parent)
    for stale in link.parent.glob(f"{link.name}.*"):
        if stale != target:
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def fsdp_strategy(**settings: Any) -> ShardedStrategy:
    """``trainer.strategy`` of ``trainer=fsdp``/``fsdp_cpu`` (arguments: FSDPSettings)."""
    plan = FSDPSettings(**settings)
    if plan.tensor_parallel_size != 1:
        raise UserError("trainer.strategy.tensor_parallel_size must be 1: no tensor parallelism")
    return ShardedStrategy(plan)
