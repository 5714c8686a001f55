"""Every YAML file in conf/ composes, passes the config check and instantiates, hub configs
included, with the network stubbed out: a config that only breaks on a user's first real run
(a typo in a preset, a renamed class) fails here instead."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, compose_train
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from clintune.errors import UserError, require_accelerator
from clintune.settings import PREFERENCE_SETTINGS, ConfigError, SFTSettings, settings_from
from clintune.tasks.base import Task

CONF = REPO / "conf"


def _options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("network access is stubbed out in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_the_groups_listed_here_are_every_group_in_conf() -> None:
    groups = {path.parent.relative_to(CONF).as_posix() for path in CONF.rglob("*/*.yaml")}
    assert groups == {
        "model",
        "task",
        "method",
        "trainer",
        "logger",
        "experiment",
        "paths",
        "eval",
        "hydra",
        "hydra/launcher",
    }


@pytest.mark.parametrize("task", _options("task"))
def test_every_task_instantiates(task: str, tmp_path: Path) -> None:
    cfg = compose_train([f"task={task}"], tmp_path)
    if task == "custom":
        # A template to fill in: its answers are the user's to name (the worked examples,
        # pubmedqa_custom and triage_custom, are instantiated as every other task).
        with pytest.raises(ConfigError, match=r"task\.answers is missing"):
            settings_from(cfg)
        return
    settings_from(cfg)
    instance = instantiate(cfg.task, _convert_="partial")
    assert isinstance(instance, Task)
    assert instance.name == cfg.task.name
    assert f"test/{instance.headline_metric}"
    if cfg.task.data.get("hub"):
        assert "/" in str(cfg.task.data.hub.dataset)  # loaded only when a run starts
    else:
        for split in ("train", "val", "test"):
            assert instance.split_path(split).is_file()


@pytest.mark.parametrize("method", _options("method"))
def test_every_method_builds_its_module(method: str, tmp_path: Path, tiny_models) -> None:
    cfg = compose_train([f"method={method}"], tmp_path)
    settings = settings_from(cfg)
    assert settings.method.name == method
    if isinstance(settings.method, (SFTSettings, *PREFERENCE_SETTINGS)):
        model = tiny_models["tiny_llama"].model
        reference = getattr(settings.method, "reference_mode", None)
        extra = {"reference": reference} if reference else {}
        module = instantiate(dataclasses.asdict(settings.method.module), model=model, **extra)
        assert module.model is model
        assert getattr(module, "reference", None) == reference


@pytest.mark.parametrize("trainer", _options("trainer"))
def test_every_trainer_instantiates_or_says_it_needs_a_gpu(trainer: str, tmp_path: Path) -> None:
    import torch

    cfg = compose_train([f"trainer={trainer}"], tmp_path)
    settings = settings_from(cfg)
    if settings.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        with pytest.raises(UserError, match="asks for a GPU"):
            require_accelerator(settings.trainer.accelerator)
        strategy = cfg.trainer.get("strategy")
        if OmegaConf.is_dict(strategy):  # a strategy object of its own: it still builds
            from lightning.pytorch.strategies import Strategy

            assert isinstance(instantiate(strategy), Strategy)
        return
    built = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert built.num_devices == (cfg.trainer.devices if cfg.trainer.devices != "auto" else 1)


@pytest.mark.parametrize("model", _options("model"))
def test_every_model_config_names_a_loadable_source(model: str, tmp_path: Path) -> None:
    from clintune.models.loading import ModelNotAvailable, load_tokenizer, resolve_source

    cfg = compose_train([f"model={model}"], tmp_path)
    settings_from(cfg)
    if cfg.model.get("tiny"):
        assert cfg.model.tiny.arch in ("llama", "mistral")
        return
    # A hub model: with no network, the first file fetched fails with one clear message.
    source = resolve_source(cfg.model, tmp_path)
    assert source == cfg.model.pretrained
    with pytest.raises(ModelNotAvailable, match=source):
        load_tokenizer(source)


@pytest.mark.parametrize("logger", _options("logger"))
def test_every_logger_config_names_its_backend(logger: str, tmp_path: Path) -> None:
    cfg = compose_train([f"logger={logger}"], tmp_path)
    assert cfg.logger.backend in ("wandb", "none")


@pytest.mark.parametrize("experiment", _options("experiment"))
@pytest.mark.parametrize("method", ["base", "sft", "dpo", "orpo", "simpo", "kto", "rpo"])
def test_every_experiment_is_valid_for_each_method(
    experiment: str, method: str, tmp_path: Path
) -> None:
    cfg = compose_train([f"experiment={experiment}", f"method={method}"], tmp_path)
    settings_from(cfg)
    instantiate(cfg.task, _convert_="partial")


@pytest.mark.parametrize("launcher", _options("hydra/launcher"))
def test_every_launcher_preset_composes_and_names_an_importable_class(launcher: str) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[f"hydra/launcher={launcher}"],
            return_hydra_config=True,
        )
    assert isinstance(get_class(str(cfg.hydra.launcher._target_)), type)


def test_evaluate_config_shares_paths_and_eval_with_train(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        evaluate = compose(config_name="evaluate")
        train = compose(config_name="train")
    assert OmegaConf.to_container(evaluate.eval) == OmegaConf.to_container(train.eval)
    assert evaluate.paths.keys() == train.paths.keys()
    settings_from(evaluate)
