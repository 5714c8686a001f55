"""Config groups compose through Hydra's real CLI, and bad configs fail clearly."""

from __future__ import annotations

import itertools

import pytest
import yaml
from helpers import run_script

MODELS = ["tiny_llama", "tiny_mistral", "llama3", "mistral2"]
METHODS = ["base", "sft"]


@pytest.mark.parametrize(("model", "method"), list(itertools.product(MODELS, METHODS)))
def test_every_model_and_method_composes_on_cpu(model: str, method: str, run_env) -> None:
    result = run_script(
        "train.py", [f"model={model}", f"method={method}", "trainer=cpu", "--cfg", "job"], run_env
    )
    cfg = yaml.safe_load(result.stdout)
    assert cfg["model"]["name"] == model
    assert cfg["method"]["name"] == method
    assert cfg["trainer"]["accelerator"] == "cpu"
    assert cfg["logger"]["backend"] == "wandb"
    if method == "base":
        assert cfg["method"]["module"] is None
    else:
        assert cfg["method"]["module"]["_target_"] == "clintune.methods.sft.SFTModule"
    hub_ids = {
        "llama3": "meta-llama/Meta-Llama-3-8B-Instruct",
        "mistral2": "mistralai/Mistral-7B-Instruct-v0.2",
    }
    assert cfg["model"]["pretrained"] == hub_ids.get(model)


def test_groups_and_switches_compose(run_env) -> None:
    result = run_script(
        "train.py",
        ["trainer=gpu", "logger=none", "model.lora.enabled=true", "--cfg", "job", "--resolve"],
        run_env,
    )
    cfg = yaml.safe_load(result.stdout)
    assert cfg["trainer"]["accelerator"] == "gpu"
    assert cfg["logger"] == {"backend": "none"}
    assert cfg["model"]["lora"]["enabled"] is True
    assert cfg["method"]["module"]["learning_rate"] == cfg["model"]["learning_rate"]


def test_run_name_group_and_tags_come_from_model_task_method(run_env) -> None:
    result = run_script(
        "train.py", ["model=tiny_mistral", "seed=7", "--cfg", "job", "--resolve"], run_env
    )
    logger = yaml.safe_load(result.stdout)["logger"]
    assert logger["name"] == "tiny_mistral-classification-sft-s7"
    assert logger["group"] == "classification"
    assert logger["tags"] == ["model:tiny_mistral", "task:classification", "method:sft", "seed:7"]


def test_unknown_group_option_fails_with_hydras_message(run_env) -> None:
    result = run_script("train.py", ["model=llama4"], run_env, check=False)
    assert result.returncode != 0
    assert "Could not find 'model/llama4'" in result.stderr
    assert "tiny_llama" in result.stderr  # Hydra lists the available options


def test_misspelt_key_fails_with_hydras_message(run_env) -> None:
    result = run_script("train.py", ["method.trian.epochs=3"], run_env, check=False)
    assert result.returncode != 0
    assert "Could not override 'method.trian.epochs'" in result.stderr


def test_gpu_trainer_without_a_gpu_is_one_clear_message(run_env) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_script("train.py", ["trainer=gpu", "logger=none"], run_env, check=False)
    assert result.returncode == 1
    assert "error: trainer.accelerator=gpu asks for a GPU, but PyTorch sees none" in result.stderr
    assert "Traceback" not in result.stderr
