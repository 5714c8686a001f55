"""Fine-tune and evaluate: `python train.py model=… task=… method=…` (see README.md)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from clintune.errors import UserError, print_user_error
    from clintune.settings import settings_from

    try:
        # Before torch and Lightning are even imported: a typo costs a second, not a stage.
        settings_from(cfg)
    except UserError as error:
        print_user_error(error)
        sys.exit(1)

    from functools import partial

    from hydra.types import RunMode

    from clintune.distributed import launch
    from clintune.jobs import run_job
    from clintune.pipeline import run

    hydra_cfg = HydraConfig.get()
    try:
        run_job(
            cfg,
            Path(hydra_cfg.runtime.output_dir),
            multirun=hydra_cfg.mode == RunMode.MULTIRUN,
            # One process, or trainer.devices ranks sharing this job's run directory.
            job=partial(launch, job=run),
        )
    except UserError as error:  # the user's to fix: a message, not a stack trace
        print_user_error(error)
        sys.exit(1)


if __name__ == "__main__":
    main()
