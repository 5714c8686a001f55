"""FSDP2 in one process: a real Lightning Trainer with clintune's ShardedStrategy on a
one-rank gloo group, where every parameter is already a DTensor outside forward (the chunked
LM head must read it inside the root's forward), against the same training unsharded: SFT
and DPO, the reference as a sharded frozen copy and as the adapter switched off (LoRA),
activation checkpointing on and off, and the gathered full weights. Two processes and the
whole pipeline: tests/e2e/test_distributed.py."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
from helpers import micro_llama
from lightning.pytorch.callbacks import Callback

from clintune.methods.dpo import DPOModule
from clintune.methods.sft import SFTModule
from clintune.settings import FSDPSettings
from clintune.sharding import ShardedStrategy, call_in_root_forward, full_state_dict
from clintune.tokenization import (
    IGNORE_INDEX,
    EncodedPair,
    collate_pairs,
    collate_pairs_shared_prompt,
)

STEPS = 3


def _plan(activation_checkpointing: bool = False) -> FSDPSettings:
    return FSDPSettings(
        data_parallel_size="auto",
        tensor_parallel_size=1,
        param_dtype=None,
        reduce_dtype=None,
        trainable_dtype="float32",
        activation_checkpointing=activation_checkpointing,
        reshard_after_forward=True,
    )


@pytest.fixture
def process_group() -> Iterator[None]:
    """The strategy starts a one-rank process group; it must not outlive the test."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


class _Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, *args: Any) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit(module: L.LightningModule, batches: list[dict], strategy: Any) -> list[float]:
    losses = _Losses()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_steps=STEPS,
        gradient_clip_val=1.0,  # clipping by the norm of sharded (DTensor) gradients
        callbacks=[losses],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the batches in order, as clintune's fit has them
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return losses.losses


def _sft_batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        input_ids = torch.randint(0, 32, (3, 9), generator=generator)
        labels = input_ids.clone()
        labels[:, :4] = IGNORE_INDEX
        batches.append(
            {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
        )
    return batches


def _pair_batches(shared_prompt: bool) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)

    def ids(length: int) -> list[int]:
        return torch.randint(1, 32, (length,), generator=generator).tolist()

    collate = collate_pairs_shared_prompt if shared_prompt else collate_pairs
    return [
        collate([EncodedPair(ids(5), ids(3), ids(2)), EncodedPair(ids(3), ids(2), ids(4))], 0)
        for _ in range(STEPS)
    ]


def _micro_llama() -> torch.nn.Module:
    """micro_llama with two decoder layers (two units besides the root), from seed 0."""
    from transformers import LlamaForCausalLM

    config = micro_llama().config
    config.num_hidden_layers = 2
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _weights(module: L.LightningModule, sharded: bool) -> dict[str, torch.Tensor]:
    if sharded:
        return full_state_dict(module.model)
    return {name: value.detach().clone() for name, value in module.model.state_dict().items()}


def _assert_same(
    make: Any, batches: list[dict], plan: FSDPSettings, *, atol: float = 1e-6
) -> tuple[L.LightningModule, L.LightningModule]:
    plain, sharded = make(), make()
    expected = _fit(plain, batches, "auto")
    got = _fit(sharded, batches, ShardedStrategy(plan))
    assert len(got) == len(expected) == STEPS
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)
    weights, reference = _weights(sharded, True), _weights(plain, False)
    assert weights.keys() == reference.keys()
    for name, value in weights.items():
        assert not isinstance(value, torch.distributed.tensor.DTensor)
        torch.testing.assert_close(value, reference[name], rtol=0, atol=atol, msg=name)
    moved = max(
        float((weights[name] - value).abs().max())
        for name, value in _weights(make(), False).items()
    )
    assert moved > 1e-3  # training moved the weights far beyond the tolerance
    return plain, sharded


def test_sft_under_fsdp2_trains_as_unsharded(process_group: None) -> None:
    _, sharded = _assert_same(
        lambda: SFTModule(_micro_llama(), learning_rate=1e-2, logits_chunk_size=4),
        _sft_batches(),
        _plan(),
    )
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    assert isinstance(sharded.model, FSDPModule)
    head = sharded.model.get_output_embeddings().weight
    # Outside forward the head is this rank's shard: the chunked head must not read it here.
    assert isinstance(head, DTensor)


@pytest.mark.parametrize("shared_prompt", [False, True], ids=["concatenated", "shared-prompt"])
def test_dpo_with_a_sharded_reference_copy_trains_as_unsharded(
    process_group: None, shared_prompt: bool
) -> None:
    def make() -> DPOModule:
        model = _micro_llama()
        return DPOModule(
            model,
            learning_rate=1e-2,
            reference="copy",
            reference_model=copy.deepcopy(model),
            logits_chunk_size=4,
        )

    _, sharded = _assert_same(make, _pair_batches(shared_prompt), _plan())
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    reference = sharded.frozen_models()[0]
    assert isinstance(reference, FSDPModule)
    # With no backward to free them, the reference's gathered root parameters (embeddings, LM
    # head: 2 GB at Llama-3-8B's vocabulary) are freed after each forward.
    assert isinstance(reference.get_output_embeddings().weight, DTensor)


def test_dpo_with_lora_and_the_adapter_disabled_reference_trains_as_unsharded(
    process_group: None,
) -> None:
    from peft import LoraConfig, get_peft_model

    def make() -> DPOModule:
        torch.manual_seed(3)
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
        model = get_peft_model(_micro_llama(), config)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # a non-zero adapter from the start: the reference differs
                parameter.data.normal_(0, 0.1)
        return DPOModule(
            model, learning_rate=1e-2, reference="adapter_disabled", logits_chunk_size=4
        )

    _, sharded = _assert_same(make, _pair_batches(False), _plan())
    frozen = [n for n, p in sharded.model.named_parameters() if not p.requires_grad]
    assert frozen and all("lora" not in name for name in frozen)


def test_activation_checkpointing_changes_memory_not_the_maths(process_group: None) -> None:
    _, sharded = _assert_same(
        lambda: SFTModule(_micro_llama(), learning_rate=1e-2, logits_chunk_size=4),
        _sft_batches(),
        _plan(activation_checkpointing=True),
    )
    assert sharded.model.is_activation_checkpointing


def test_the_root_forward_is_where_a_sharded_head_is_whole(process_group: None) -> None:
    """What the methods rely on: inside ``call_in_root_forward`` the LM head's weight is the
    gathered tensor; outside, a DTensor shard."""
    module = SFTModule(_micro_llama(), learning_rate=1e-2)
    _fit(module, _sft_batches()[:1], ShardedStrategy(_plan()))
    seen = call_in_root_forward(
        module.model, lambda model: model.get_output_embeddings().weight.detach().clone()
    )
    assert type(seen) is torch.Tensor and seen.shape == (32, 16)


def test_a_sharded_checkpoint_is_published_whole_or_not_at_all(tmp_path: Path) -> None:
    """``last.ckpt`` is a link replaced in one rename: until a new version is complete and
    published, it points at the previous one; publishing removes every other version."""
    from clintune.sharding import _publish_checkpoint

    link = tmp_path / "last.ckpt"

    def version(name: str, step: int) -> Path:
        directory = tmp_path / f"last.ckpt.{name}"
        directory.mkdir()
        (directory / "meta.pt").write_text(str(step))
        return directory

    _publish_checkpoint(link, version("a", 1))
    killed = version("b", 2)  # written, then the save was killed before publishing
    assert (link / "meta.pt").read_text() == "1"
    _publish_checkpoint(link, version("c", 3))
    assert link.is_symlink() and (link / "meta.pt").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.c"]
    assert not killed.exists()
