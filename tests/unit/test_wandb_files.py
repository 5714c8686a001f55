"""Round-trip real offline W&B runs through clintune.wandb_files.

The runs are produced by the installed wandb (and Lightning's WandbLogger), not hand-made
fixtures, so a wandb upgrade that changes the on-disk format fails here first.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from clintune.wandb_files import OfflineRun, find_offline_runs, read_run

# One worker runs this module under -n: its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("wandb_files")

BIG = "x" * 70_000  # > two 32 KiB blocks, so the record is split into FIRST/MIDDLE/LAST chunks


def _offline_env(mp: pytest.MonkeyPatch, base: Path) -> None:
    """Keep wandb silent, offline and out of the real home directory."""
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("WANDB_MODE", "offline")
    for var, sub in [
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
    ]:
        (base / sub).mkdir(parents=True, exist_ok=True)
        mp.setenv(var, str(base / sub))


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One plain `wandb.init` run, shared by the tests that only read it."""
    import wandb

    base = tmp_path_factory.mktemp("plain")
    with pytest.MonkeyPatch.context() as mp:
        _offline_env(mp, base)
        run = wandb.init(
            mode="offline",
            dir=base,
            project="p",
            name="n",
            group="g",
            tags=["a", "b"],
            config={"lr": 0.1, "nested": {"x": 1}, "blob": BIG},
        )
        for loss in (1.0, 0.5, 0.25):
            run.log({"train/loss": loss})
        run.summary["test/f1"] = 0.5
        run.summary["gone"] = 1
        del run.summary["gone"]
        run.log({"preds": wandb.Table(columns=["a", "b"], data=[[1, 2], [3, 4]])})
        run.finish()
        wandb.teardown()  # finish() may return before wandb-core flushed the file
    [path] = find_offline_runs(base)
    yield path


def test_plain_run_round_trip(plain_run: Path) -> None:
    run = read_run(plain_run)

    assert isinstance(run, OfflineRun)
    assert plain_run.name == f"run-{run.run_id}.wandb"
    assert plain_run.parent.name.startswith("offline-run-")
    assert (run.name, run.group, run.tags, run.project) == ("n", "g", ["a", "b"], "p")
    assert run.config["lr"] == 0.1
    assert run.config["nested"] == {"x": 1}
    assert run.config["blob"] == BIG
    assert run.summary["test/f1"] == 0.5
    assert run.summary["train/loss"] == 0.25
    assert "gone" not in run.summary
    assert run.summary["preds"]["_type"] == "table-file"

    losses = [(row["_step"], row["train/loss"]) for row in run.history if "train/loss" in row]
    assert losses == [(0, 1.0), (1, 0.5), (2, 0.25)]
    [table_row] = [row for row in run.history if "preds" in row]
    assert table_row["_step"] == 3
    assert table_row["preds"]["nrows"] == 2
    assert run.tables == ["preds"]
    assert any(f.startswith("media/table/preds_") for f in run.files)
    assert (plain_run.parent / "files" / run.summary["preds"]["path"]).is_file()
    assert run.exit_code == 0
    assert run.truncated is False
    assert run.truncated_at is None


def test_lightning_wandb_logger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    _offline_env(monkeypatch, tmp_path)
    logger = WandbLogger(
        offline=True, save_dir=str(tmp_path), project="lp", name="ln", group="lg", tags=["t"]
    )
    logger.log_hyperparams({"lr": 1e-3, "model": {"name": "m", "layers": 2}, "seed": None})
    logger.log_metrics({"train/loss": 2.0}, step=0)
    logger.log_metrics({"train/loss": 1.5, "val/f1": 0.3}, step=5)
    logger.experiment.summary.update({"test/f1": 0.7, "test/n": 12})
    logger.experiment.finish()
    wandb.teardown()  # finish() may return before wandb-core flushed the file

    [path] = find_offline_runs(tmp_path)
    run = read_run(path)
    assert (run.name, run.group, run.tags, run.project) == ("ln", "lg", ["t"], "lp")
    assert run.run_id == logger.version
    assert run.config["lr"] == 1e-3
    assert run.config["model"] == {"name": "m", "layers": 2}
    assert run.config["seed"] is None
    assert run.summary["test/f1"] == 0.7
    assert run.summary["test/n"] == 12
    assert run.summary["val/f1"] == 0.3
    metric_rows = [row for row in run.history if "train/loss" in row]
    # Lightning logs its own step under "trainer/global_step"; "_step" is W&B's counter.
    assert [(r["trainer/global_step"], r["train/loss"]) for r in metric_rows] == [
        (0, 2.0),
        (5, 1.5),
    ]
    assert run.tables == []
    assert run.truncated is False


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_truncated_file_keeps_earlier_records(plain_run: Path, tmp_path: Path) -> None:
    full = read_run(plain_run)
    data = plain_run.read_bytes()
    blob_end = 71_000  # the 70 kB run record (with its config) ends just before this

    # Somewhere among the history records, nudged off a record boundary if it lands on one.
    mid = (len(data) + blob_end) // 2
    if not read_run(_write(tmp_path / "probe.wandb", data[:mid])).truncated:
        mid += 1

    for cut in (40_000, mid, len(data) - 3):
        run = read_run(_write(tmp_path / f"cut{cut}" / plain_run.name, data[:cut]))
        assert run.truncated is True, cut
        assert run.truncated_at is not None and run.truncated_at < cut
        assert run.exit_code is None
        assert run.history == full.history[: len(run.history)]

        # Cutting exactly where reading stopped leaves only whole records: a clean read.
        again = read_run(_write(tmp_path / f"clean{cut}.wandb", data[: run.truncated_at]))
        assert again.truncated is False
        assert (again.history, again.summary, again.config) == (
            run.history,
            run.summary,
            run.config,
        )

        if cut == 40_000:  # inside the multi-block run record: it is dropped whole
            assert run.run_id == "" and run.config == {} and run.history == []
        else:  # run identity and config come first, so they survive any later cut
            assert (run.run_id, run.name, run.tags) == (full.run_id, full.name, full.tags)
            assert run.config == full.config
        if cut == mid:
            assert 1 <= len(run.history) < len(full.history)
        if cut == len(data) - 3:  # only the final exit record is lost
            assert run.history == full.history
            assert run.summary == full.summary


def test_corrupt_tail_stops_reading(plain_run: Path, tmp_path: Path) -> None:
    data = bytearray(plain_run.read_bytes())
    data[-3] ^= 0xFF  # CRC mismatch in the last record, as after a torn write
    run = read_run(_write(tmp_path / plain_run.name, bytes(data)))
    assert run.truncated is True
    assert run.history == read_run(plain_run).history


def test_garbage_file_raises_value_error(tmp_path: Path) -> None:
    junk = tmp_path / "run-junk.wandb"
    junk.write_bytes(b"definitely not a wandb transaction log\n" * 10)
    with pytest.raises(ValueError, match=re.escape(str(junk))):
        read_run(junk)

    short = tmp_path / "run-short.wandb"
    short.write_bytes(b":W&")
    with pytest.raises(ValueError, match=re.escape(str(short))):
        read_run(short)


def test_find_offline_runs_sorted_and_recursive(plain_run: Path, tmp_path: Path) -> None:
    for sub in ("b/deep/offline-run-2", "a/offline-run-1"):
        dest = tmp_path / sub
        dest.mkdir(parents=True)
        shutil.copy(plain_run, dest / plain_run.name)
    (tmp_path / "a" / "not-a-run.wandb").write_bytes(b"")

    found = find_offline_runs(str(tmp_path))
    assert found == sorted(found)
    assert [p.relative_to(tmp_path).parts[0] for p in found] == ["a", "b"]
    assert all(p.name == plain_run.name for p in found)
