"""method.save=best_metric: the weights of the validation with the best headline metric
(greedy generation on the validation split at each validation), not the lowest eval/loss;
with a real tiny model, a real Lightning trainer and the real SFT stage."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from helpers import compose_train
from hydra.utils import instantiate

from clintune.checkpointing import SaveWeights
from clintune.models.loading import CHECKPOINT_MANIFEST
from clintune.settings import ConfigError, settings_from
from clintune.stages import StageContext, run_sft_stage
from clintune.tasks.classification import ClassificationTask

# What the scripted task's validation metric says at each of the three validations: the
# second is best, while eval/loss falls at every step (so save=best keeps the third).
SCRIPT = [0.25, 0.75, 0.5]


class ScriptedTask(ClassificationTask):
    """The classification task, whose validation headline follows SCRIPT; it checks that it
    is asked about the model's generated outputs for every validation example."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.asked: list[int] = []

    def headline_value(self, examples: list[dict[str, Any]], outputs: list[str]) -> float:
        assert len(outputs) == len(examples) and all(isinstance(o, str) for o in outputs)
        self.asked.append(len(outputs))
        return SCRIPT[len(self.asked) - 1]


def _stage(save: str, cache: Path, run_dir: Path) -> tuple[dict[str, float], ScriptedTask]:
    overrides = [
        "task=classification",
        f"method.save={save}",
        "method.train.max_steps=3",
        "method.train.batch_size=4",
        "method.train.val_check_interval=1",
        "method.module.learning_rate=1e-3",
        "logger=none",
    ]
    cfg = compose_train(overrides, cache)
    settings = settings_from(cfg)
    base = instantiate(cfg.task, _convert_="partial")
    task = ScriptedTask(
        name=base.name, data=base.data, instruction=base.instruction, labels=base.labels
    )
    splits = {"train": task.load_split("train")[:12], "val": task.load_split("val")[:5]}
    ctx = StageContext(cfg, settings, task, splits, run_dir, None)
    result = run_sft_stage(ctx, settings.method, run_dir / "model")  # type: ignore[arg-type]
    return result.metrics, task


def _logged(run_dir: Path, key: str) -> list[tuple[int, float]]:
    with (run_dir / "logs" / "metrics.csv").open() as handle:
        return [
            (int(row["step"]), float(row[key])) for row in csv.DictReader(handle) if row.get(key)
        ]


def test_best_metric_keeps_the_validation_with_the_best_headline(
    cache_dir: Path, tmp_path: Path
) -> None:
    metrics, task = _stage("best_metric", cache_dir, tmp_path / "metric")
    assert task.asked == [5, 5, 5]  # one generation pass over the 5 val examples per validation
    manifest = json.loads((tmp_path / "metric" / "model" / CHECKPOINT_MANIFEST).read_text())
    assert manifest["eval/f1_macro"] == 0.75 and manifest["step"] == 2
    assert metrics["train/sft/best_eval_f1_macro"] == 0.75
    assert [value for _, value in _logged(tmp_path / "metric", "eval/f1_macro")] == SCRIPT
    # The same run with save=best watches eval/loss, which does not follow the script.
    metrics, task = _stage("best", cache_dir, tmp_path / "loss")
    assert task.asked == []  # no generation during training
    manifest = json.loads((tmp_path / "loss" / "model" / CHECKPOINT_MANIFEST).read_text())
    losses = [value for _, value in _logged(tmp_path / "loss", "eval/loss")]
    assert losses == sorted(losses, reverse=True) and len(set(losses)) == 3  # falls each time
    assert manifest["step"] == 3 and manifest["eval/loss"] == pytest.approx(losses[-1])
    assert "eval/f1_macro" not in manifest
    assert "train/sft/best_eval_loss" in metrics


@pytest.mark.parametrize(
    ("values", "saved"),
    [([0.2, 0.6, 0.6, 0.4], [0.2, 0.6]), ([0.5, float("nan"), 0.7], [0.5, 0.7])],
)
def test_a_higher_metric_is_better_and_a_tie_keeps_the_earlier(values: list, saved: list) -> None:
    saver = SaveWeights(Path("unused"), None, monitor="eval/accuracy", save="best_metric", info={})
    kept = []
    for value in values:
        if value == value and (saver.best is None or saver.improves(value, saver.best)):
            saver.best = value
            kept.append(value)
    assert kept == saved
    loss_saver = SaveWeights(Path("unused"), None, monitor="eval/loss", save="best", info={})
    assert loss_saver.improves(0.1, 0.2) and not loss_saver.improves(0.3, 0.2)


@pytest.mark.parametrize("key", ["method.save", "method.sft.save"])
def test_best_metric_is_refused_under_fsdp(key: str, tmp_path: Path) -> None:
    assert settings_from(compose_train(["method=dpo", f"{key}=best_metric"], tmp_path))
    cfg = compose_train(["method=dpo", f"{key}=best_metric", "trainer=fsdp"], tmp_path)
    with pytest.raises(ConfigError, match=rf"{key}='best_metric' generates on the validation"):
        settings_from(cfg)
