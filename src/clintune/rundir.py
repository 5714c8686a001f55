"""The run directory's files, named once (shared/design.md has the contract). The pipeline,
the stages, the job bookkeeping, the report and evaluate.py all read these names."""

from __future__ import annotations

#: Hydra's copy of the composed config; evaluate.py reads a finished run's from here.
HYDRA_CONFIG = ".hydra/config.yaml"
#: Flat ``test/…``, ``compute/…`` and ``data/…`` figures; written last, atomically.
METRICS = "metrics.json"
#: One line per test example: id, output, prediction, target and per-example scores.
PREDICTIONS = "predictions.jsonl"
#: The final weights or LoRA adapter, in Hugging Face format.
WEIGHTS = "model"
#: The SFT stage's weights inside a method=dpo run.
SFT_WEIGHTS = "sft_model"
#: Config hash, status (running, finished, failed, interrupted) and headline metric.
JOB = "job.json"
#: Why a job of a multirun failed.
FAILURE = "failure.json"
#: Lightning's CSV curves (``logs/metrics.csv``, ``logs/sft/metrics.csv``).
LOGS = "logs"
#: The W&B run (offline by default).
WANDB = "wandb"
