"""Shared fixtures: one model cache per test session, W&B offline and sandboxed. Helpers
(run_script, compose_train, REPO) live in helpers.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# tests/unit and tests/e2e import the shared helpers from here.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import compose_train


def pytest_configure(config: pytest.Config) -> None:
    """Under ``-n N`` each worker gets its share of the cores, and so do the train.py processes
    it starts (they inherit the environment): N workers each running torch on every core would
    spin on one another's cores and run slower than one worker alone."""
    # No test may reach the network: a hub lookup fails at once instead of retrying for ~45 s.
    os.environ["HF_HUB_OFFLINE"] = "1"
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads
        import torch

        torch.set_num_threads(int(threads))


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


@pytest.fixture(scope="session")
def tiny_models(cache_dir: Path) -> dict[str, object]:
    """Both tiny models, built once per session through the real builder and loader."""
    from clintune.models.loading import load_model

    loaded = {}
    for name in ("tiny_llama", "tiny_mistral"):
        cfg = compose_train([f"model={name}"], cache_dir)
        loaded[name] = load_model(cfg.model, cache_dir)
    return loaded
