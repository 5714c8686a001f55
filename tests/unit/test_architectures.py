"""The study's 8B models without the hub: ``model=llama3`` and ``model=mistral2`` declare their
architecture, which builds on the meta device to the published parameter counts, takes the
FSDP2 plan (every decoder layer its own unit) on a faked 8-rank world, and stops a run whose
downloaded weights are another model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import compose_train
from omegaconf import OmegaConf

from clintune.errors import UserError
from clintune.models.architecture import check_architecture, meta_model, transformers_config
from clintune.settings import settings_from

PARAMETERS = {"llama3": 8_030_261_248, "mistral2": 7_241_732_096}


def _architecture(name: str, tmp_path: Path) -> dict:
    cfg = compose_train([f"model={name}"], tmp_path)
    return OmegaConf.to_container(cfg.model.architecture)


@pytest.fixture(scope="module")
def meta_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.nn.Module]:
    tmp = tmp_path_factory.mktemp("architectures")
    # In bfloat16, as model.dtype loads them.
    return {name: meta_model(_architecture(name, tmp), torch.bfloat16) for name in PARAMETERS}


def test_the_8b_configs_build_on_the_meta_device_to_the_published_sizes(
    meta_models: dict[str, torch.nn.Module],
) -> None:
    for name, expected in PARAMETERS.items():
        model = meta_models[name]
        assert all(p.is_meta and p.dtype == torch.bfloat16 for p in model.parameters())
        assert sum(p.numel() for p in model.parameters()) == expected, name
    mistral = meta_models["mistral2"].config
    assert mistral.sliding_window is None and mistral.rope_parameters["rope_theta"] == 1e6
    assert meta_models["llama3"].config.rope_parameters["rope_theta"] == 500_000.0


@pytest.fixture
def fake_world() -> Iterator[int]:
    """A process group of 8 ranks faked in this one process (torch's testing backend): the
    sharding plan is applied as it would be on an 8-GPU machine, with no communication."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    world = 8
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield world
    finally:
        dist.destroy_process_group()


def test_the_fsdp2_plan_makes_every_decoder_layer_its_own_unit(
    meta_models: dict[str, torch.nn.Module], fake_world: int, tmp_path: Path
) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    from clintune.sharding import decoder_layers, shard_causal_lm

    plan = settings_from(compose_train(["trainer=fsdp"], tmp_path)).trainer.sharding
    assert plan is not None
    mesh = init_device_mesh("cpu", (fake_world,))
    for name, model in meta_models.items():
        layers = decoder_layers(model)
        assert len(layers) == 32
        shard_causal_lm(model, mesh, plan)
        assert isinstance(model, FSDPModule), name

        def unit_parameters(module: torch.nn.Module) -> set[int]:
            groups = fully_shard.state(module)._fsdp_param_groups
            return {id(p.sharded_param) for group in groups for p in group.fsdp_params}

        covered: set[int] = set()
        for layer in layers:
            assert isinstance(layer, FSDPModule)
            own = unit_parameters(layer)
            assert own == {id(p) for p in layer.parameters()}, name  # the layer, whole
            assert not own & covered
            covered |= own
        root = unit_parameters(model)
        assert not root & covered
        # The root unit holds exactly what no layer holds: embeddings, final norm, LM head.
        assert root | covered == {id(p) for p in model.parameters()}
        assert len(root) == 3
        q_proj = layers[0].self_attn.q_proj.weight
        assert isinstance(q_proj, DTensor)
        assert q_proj.to_local().shape == (4096 // fake_world, 4096)  # one rank's rows
        # Full fine-tuning keeps the optimiser's copy in float32, loaded in bf16 or not.
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]


def test_weights_that_are_not_the_declared_model_stop_the_run(tmp_path: Path) -> None:
    declared = _architecture("mistral2", tmp_path)
    check_architecture(transformers_config(declared), declared, "hub")  # itself: fine
    llama = transformers_config(_architecture("llama3", tmp_path))
    with pytest.raises(UserError, match=r"vocab_size: declared 32000, loaded 128256") as raised:
        check_architecture(llama, declared, "meta-llama/Meta-Llama-3-8B-Instruct")
    assert "arch: declared 'mistral', loaded 'llama'" in str(raised.value)
    assert "rope_theta: declared 1000000.0, loaded 500000.0" in str(raised.value)


def test_loading_weights_checks_them_against_the_declared_architecture(cache_dir: Path) -> None:
    from clintune.models.loading import load_model

    declared = ["+model.architecture.arch=llama", "+model.architecture.num_hidden_layers=32"]
    cfg = compose_train(["model=tiny_llama", *declared], cache_dir)
    with pytest.raises(UserError, match="num_hidden_layers: declared 32, loaded 4"):
        load_model(cfg.model, cache_dir)
    matching = ["+model.architecture.arch=llama", "+model.architecture.num_hidden_layers=4"]
    assert load_model(compose_train(["model=tiny_llama", *matching], cache_dir).model, cache_dir)
