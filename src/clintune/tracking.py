"""Weights & Biases, offline unless asked otherwise. Numbers, ids and configs always go; text
(inputs, outputs, targets, judge outputs, console lines) only when ``clintune.privacy`` allows
it for every split of the run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def wandb_mode(logger_cfg: DictConfig) -> str:
    """An explicit ``logger.offline`` wins; otherwise WANDB_MODE; otherwise offline."""
    offline = logger_cfg.get("offline")
    if offline is not None:
        return "offline" if offline else "online"
    return os.environ.get("WANDB_MODE") or "offline"


def start_wandb(
    cfg: DictConfig,
    run_dir: Path,
    job_type: str,
    *,
    capture_console: bool = False,
    extra_config: dict[str, Any] | None = None,
) -> Any | None:
    """``capture_console`` off keeps stdout/stderr out of the run: a warning or a data error
    may quote the data. The console is still in Hydra's log file in the run directory."""
    if cfg.logger.get("backend") != "wandb":
        return None
    import wandb

    logger_cfg = cfg.logger
    return wandb.init(
        project=logger_cfg.project,
        entity=logger_cfg.get("entity"),
        name=logger_cfg.name,
        group=logger_cfg.get("group"),
        tags=[str(tag) for tag in logger_cfg.get("tags") or []],
        job_type=job_type,
        dir=str(run_dir),
        mode=wandb_mode(logger_cfg),
        config={**OmegaConf.to_container(cfg, resolve=True), **(extra_config or {})},  # type: ignore[dict-item]
        reinit="finish_previous",
        # quiet: the run's summary is printed by clintune once; W&B still says where it is.
        settings=wandb.Settings(console="auto" if capture_console else "off", quiet=True),
    )


def log_results(
    run: Any,
    metrics: dict[str, float],
    predictions: list[dict[str, Any]],
    inputs: list[str],
    *,
    may_log_text: bool,
) -> None:
    import wandb

    run.summary.update(metrics)
    if not may_log_text:
        return
    columns = ["id", "input", "output", "prediction", "target"]
    extra = [key for key in predictions[0] if key not in columns] if predictions else []
    table = wandb.Table(columns=columns + extra)
    for row, text in zip(predictions, inputs, strict=True):
        table.add_data(
            row["id"],
            text,
            row["output"],
            str(row["prediction"]),
            str(row["target"]),
            *[row[key] for key in extra],
        )
    run.log({"test/predictions": table})


def finish_wandb(run: Any | None, failed: bool) -> None:
    if run is None:
        return
    import wandb

    run.finish(exit_code=1 if failed else 0)
    # finish() can return before wandb-core has flushed an offline run file; teardown waits
    # for it, so the run directory is complete when the job ends (seen with wandb 0.31).
    wandb.teardown()
