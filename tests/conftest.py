"""Shared fixtures: one model cache per test session, W&B offline and sandboxed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clintune-cache")


@pytest.fixture(scope="session")
def run_env(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for subprocess runs of train.py: offline W&B whose own files stay in tmp."""
    wandb_home = tmp_path_factory.mktemp("wandb-home")
    env = dict(os.environ)
    env.update(
        CLINTUNE_CACHE=str(cache_dir),
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_CONFIG_DIR=str(wandb_home / "config"),
        WANDB_CACHE_DIR=str(wandb_home / "cache"),
        WANDB_DATA_DIR=str(wandb_home / "data"),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def run_script(
    script: str, args: list[str], env: dict[str, str], check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{script} {' '.join(args)} exited {result.returncode}\n"
            f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-6000:]}"
        )
    return result


def compose_train(overrides: list[str], cache: Path) -> DictConfig:
    """The composed train config, with the paths Hydra would fill in at run time."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root = str(REPO)
        cfg.paths.cache_dir = str(cache)
    return cfg


@pytest.fixture(scope="session")
def tiny_models(cache_dir: Path) -> dict[str, object]:
    """Both tiny models, built once per session through the real builder and loader."""
    from clintune.models.loading import load_model

    loaded = {}
    for name in ("tiny_llama", "tiny_mistral"):
        cfg = compose_train([f"model={name}"], cache_dir)
        loaded[name] = load_model(cfg.model, cache_dir)
    return loaded
