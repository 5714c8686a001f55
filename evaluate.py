"""Evaluate a base model, a checkpoint or a train.py run directory (see README.md)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from clintune.errors import UserError, print_user_error
    from clintune.settings import settings_from

    try:
        settings_from(cfg)  # before torch loads; a run directory's own config is checked later
        from clintune.pipeline import evaluate_checkpoint

        evaluate_checkpoint(cfg, Path(HydraConfig.get().runtime.output_dir))
    except UserError as error:  # the user's to fix: a message, not a stack trace
        print_user_error(error)
        sys.exit(1)


if __name__ == "__main__":
    main()
