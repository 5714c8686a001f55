"""Checkpoint and resume: a SIGKILL mid-epoch, then the same command, ends bit-identical to
an uninterrupted run (SFT; DPO on one process, on two with DDP and on two sharded with FSDP2;
ORPO on one process; KTO on one and on two with DDP);
SIGTERM saves a checkpoint and exits 143 (one process, DDP, FSDP2); under submitit the job
requeues itself and resumes; checkpoints are never half-written, sharded ones included."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import REPO, micro_llama, run_script

from clintune.checkpointing import AtomicCheckpointIO, EpochSampler

ARGS = [
    "model=tiny_llama",
    "task=classification",
    "method=sft",
    "subsample.train=96",
    "subsample.val=16",
    "method.train.batch_size=8",
    "method.train.epochs=2",
    "eval.limit=10",
    "eval.bootstrap.samples=20",
    "stages.reuse=false",
]


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    """train.py in its own process group, stdout and stderr (progress bar) into ``log``."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=REPO,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_for(condition, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + 300
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _checkpoints(cache: Path, stage: str = "sft") -> list[Path]:
    return list((cache / "training").glob(f"{stage}-*/last.ckpt"))


def _checkpoint_step(checkpoint: Path) -> int:
    """The optimiser step a checkpoint was saved at: a file, or under FSDP a link to a
    directory of shards whose metadata (Lightning's meta.pt) holds the step."""
    if checkpoint.is_dir():
        checkpoint = checkpoint / "meta.pt"
    return int(torch.load(checkpoint, weights_only=False)["global_step"])


def _training_started(log: Path) -> bool:
    # Printed by TrainingState once its signal handlers are installed: from here a signal is
    # caught and saved, never the default handler's kill.
    marker = "now saves a checkpoint at the next optimiser step"
    return log.is_file() and marker in log.read_text(errors="replace")


def _past_fit_setup() -> None:
    """Into the first steps, so that the signal lands inside training rather than at once."""
    time.sleep(0.5)


def _test_results(run_dir: Path) -> dict[str, float]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {key: value for key, value in metrics.items() if key.startswith("test/")}


def _model_files(run_dir: Path) -> dict[str, bytes]:
    """Every file of the saved weights folder (full weights or adapter, manifest, tokenizer)."""
    folder = run_dir / "model"
    files = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        content = path.read_bytes()
        if path.name == "adapter_config.json":
            # peft writes target_modules from a set: in an order that differs between processes.
            config = json.loads(content)
            config["target_modules"] = sorted(config["target_modules"])
            content = json.dumps(config, sort_keys=True).encode()
        files[str(path.relative_to(folder))] = content
    return files


def _kill_mid_epoch_then_rerun_ends_bit_identical(
    args: list[str],
    tmp_path: Path,
    run_env: dict[str, str],
    cache_dir: Path,
    *,
    stage: str,
    steps_per_epoch: int,
    total_steps: int,
) -> None:
    """Runs ``args`` uninterrupted; then again, SIGKILLed (all ranks) inside the first epoch
    after its first periodic checkpoint; then the same command once more, which must resume
    and end with the same weights, predictions and test metrics, bit for bit."""
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    run_script("train.py", [*args, f"hydra.run.dir={reference}"], run_env)
    assert not _checkpoints(cache_dir, stage), "a finished stage leaves no checkpoint behind"

    process = _start([*args, f"hydra.run.dir={interrupted}"], run_env, tmp_path / "killed.log")
    _wait_for(lambda: _checkpoints(cache_dir, stage), "the first checkpoint", process)
    time.sleep(0.3)  # somewhere inside the next steps, not at a save
    assert process.poll() is None
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and, under DDP, every rank
    process.wait()
    assert not (interrupted / "metrics.json").exists()
    assert 0 < _checkpoint_step(_checkpoints(cache_dir, stage)[0]) < steps_per_epoch, (
        "killed inside the first epoch"
    )

    resumed = run_script("train.py", [*args, f"hydra.run.dir={interrupted}"], run_env)
    assert "Resuming" in resumed.stdout
    metrics = json.loads((interrupted / "metrics.json").read_text())
    assert metrics[f"compute/{stage}/resumed"] == 1.0
    assert metrics[f"compute/{stage}/optimizer_steps"] == total_steps
    assert _test_results(interrupted) == _test_results(reference)
    reference_metrics = json.loads((reference / "metrics.json").read_text())
    # The compute counters carry over the killed attempt (every rank's own share): the
    # stage's total cost.
    for counter in ("tokens", "padding_tokens"):
        key = f"compute/{stage}/{counter}"
        assert metrics[key] == reference_metrics[key], key
    assert (interrupted / "predictions.jsonl").read_text() == (
        reference / "predictions.jsonl"
    ).read_text()
    first, second = _model_files(reference), _model_files(interrupted)
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []
    assert not _checkpoints(cache_dir, stage)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_same_command_ends_bit_identical(
    tmp_path: Path, run_env, cache_dir: Path
) -> None:
    _kill_mid_epoch_then_rerun_ends_bit_identical(
        [*ARGS, "seed=11", "checkpoint.every_n_steps=2"],
        tmp_path,
        run_env,
        cache_dir,
        stage="sft",
        steps_per_epoch=12,  # 96 examples / 8
        total_steps=24,
    )


DPO_ARGS = [
    "model=tiny_llama",
    "task=triage",
    # A one-word instruction: prompts of 43 to 63 tokens instead of ~265, so cheap steps, whose
    # lengths still differ between batches and ranks (unlike prompts cut to model.max_length).
    "task.instruction=Triage",
    "method=dpo_only",  # no SFT stage: DPO from the tiny model, the cheapest DPO stage
    "method.pairs.source=label",
    # A LoRA adapter's dropout draws from the random generators at every step (a different
    # number of draws on each rank, whose batches differ in length), so a resume that does not
    # restore every rank's own generators ends with different weights.
    "model.lora.enabled=true",
    "method.module.learning_rate=1e-3",
    "subsample.train=24",
    "subsample.val=8",
    "method.train.epochs=1",
    "eval.limit=4",
    "eval.bootstrap.samples=20",
    "stages.reuse=false",
    "checkpoint.every_n_steps=2",
    "logger=none",
]


def _with_method(method: str, args: list[str]) -> list[str]:
    """DPO_ARGS for another preference method (Hydra takes one ``method=`` choice)."""
    return [f"method={method}" if arg == "method=dpo_only" else arg for arg in args]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "trainer", "batch_size", "seed", "extra"),
    [
        # DPO from the base model: 24 pairs / a global batch of 4.
        ("dpo_only", "cpu", 4, 16, []),
        # LoRA under FSDP2, with the reference the policy's own adapter switched off. Two
        # data-parallel processes resume under KTO below (ORPO resumes as DPO does: the same
        # preference stage, with no reference to restore).
        ("dpo_only", "fsdp_cpu", 2, 18, ["method.reference=adapter_disabled"]),
        # From the base model too (no SFT stage, the cheapest KTO stage), against the
        # precomputed reference: 12 examples' pairs unpaired into 24 examples / 4 per step,
        # each batch with its mismatched completions for the KL reference point.
        ("kto", "cpu", 4, 21, ["method.sft=null", "subsample.train=12"]),
        # KTO's KL reference point is averaged over the ranks at every step.
        ("kto", "ddp_cpu", 2, 22, ["method.sft=null", "subsample.train=12"]),
    ],
    ids=["1-process", "2-processes-fsdp", "kto-1-process", "kto-2-processes"],
)
def test_preference_sigkill_mid_epoch_then_same_command_ends_bit_identical(
    tmp_path: Path,
    run_env,
    cache_dir: Path,
    method: str,
    trainer: str,
    batch_size: int,
    seed: int,
    extra: list[str],
) -> None:
    _kill_mid_epoch_then_rerun_ends_bit_identical(
        [
            *_with_method(method, DPO_ARGS),
            *extra,
            f"trainer={trainer}",
            f"method.train.batch_size={batch_size}",
            f"seed={seed}",
        ],
        tmp_path,
        run_env,
        cache_dir,
        stage="dpo" if method == "dpo_only" else method,
        steps_per_epoch=6,  # 24 pairs, or 24 unpaired examples, / a global batch of 4
        total_steps=6,
    )


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_143_and_the_rerun_resumes(
    tmp_path: Path, run_env, cache_dir: Path
) -> None:
    # No periodic saves: a checkpoint can only come from the SIGTERM handling.
    args = [*ARGS, "seed=12", "checkpoint.every_n_steps=0", f"hydra.run.dir={tmp_path / 'run'}"]
    log = tmp_path / "run.log"
    process = _start(args, run_env, log)
    _wait_for(lambda: _training_started(log), "training to start", process)
    _past_fit_setup()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=300)
    stdout = log.read_text()
    assert process.returncode == 143, stdout
    assert "interrupted: stopped by SIGTERM after saving" in stdout
    assert len(_checkpoints(cache_dir)) == 1
    job = json.loads((tmp_path / "run" / "job.json").read_text())
    assert job["status"] == "interrupted"

    resumed = run_script("train.py", args, run_env)
    assert "Resuming" in resumed.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["compute/sft/resumed"] == 1.0
    assert metrics["compute/sft/optimizer_steps"] == 24
    assert json.loads((tmp_path / "run" / "job.json").read_text())["status"] == "finished"


def _submitit_task(sweep: Path) -> psutil.Process | None:
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "submitit.core._submit" in cmdline and str(sweep) in cmdline:
            return process
    return None


@pytest.mark.slow
def test_sigterm_under_submitit_saves_requeues_and_the_requeued_job_resumes(
    tmp_path: Path, run_env
) -> None:
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "hydra/launcher=submitit_local_preset",
        *ARGS,
        "seed=13",
        "logger=none",
        "checkpoint.every_n_steps=0",
        f"hydra.sweep.dir={sweep}",
    ]
    process = _start(args, run_env, tmp_path / "sweep.log")

    def task_training() -> bool:
        return any(_training_started(log) for log in sweep.glob(".submitit/*/*_log.*"))

    _wait_for(task_training, "the submitit task to train", process)
    _past_fit_setup()
    task = _submitit_task(sweep)
    assert task is not None
    task.send_signal(signal.SIGTERM)
    process.wait(timeout=600)
    assert process.returncode == 0, (tmp_path / "sweep.log").read_text()
    job_dir = sweep / "tiny_llama-classification-sft-s13"
    metrics = json.loads((job_dir / "metrics.json").read_text())
    assert metrics["compute/sft/resumed"] == 1.0
    assert metrics["compute/sft/optimizer_steps"] == 24
    logs = "".join(log.read_text() for log in sweep.glob(".submitit/*/*_log.*"))
    assert "interrupted: stopped by SIGTERM after saving" in logs
    assert "Requeued job" in logs
    assert "Resuming" in logs


def test_checkpoint_write_is_atomic_a_failed_save_keeps_the_previous_one(
    tmp_path: Path,
) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left


def test_sampler_order_is_the_same_for_any_world_size_and_skip_resumes_mid_epoch() -> None:
    data = list(range(16))
    single = EpochSampler(data, shuffle=True, seed=3)
    single.set_epoch(1)
    order = list(single)
    assert sorted(order) == data and order != data
    ranks = []
    for rank in (0, 1):
        sampler = EpochSampler(data, shuffle=True, seed=3, num_replicas=2, rank=rank)
        sampler.set_epoch(1)
        ranks.append(list(sampler))
    # Step k's global batch of 4 = rank 0's and rank 1's batch k of 2.
    for step in range(4):
        two = set(ranks[0][2 * step : 2 * step + 2]) | set(ranks[1][2 * step : 2 * step + 2])
        assert two == set(order[4 * step : 4 * step + 4])
    single.skip = 6
    assert list(single) == order[6:]
    assert list(single) == order  # the skip applies to one pass only


def test_random_generator_states_survive_a_weights_only_checkpoint_load(tmp_path: Path) -> None:
    import random

    import numpy as np

    from clintune.checkpointing import _rng_state, _set_rng_state

    AtomicCheckpointIO().save_checkpoint({"rng": _rng_state()}, tmp_path / "rng.ckpt")
    expected = (torch.rand(3), np.random.rand(), random.random())
    _set_rng_state(torch.load(tmp_path / "rng.ckpt", weights_only=True)["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert (np.random.rand(), random.random()) == expected[1:]


def _generator_fingerprint() -> bytes:
    return torch.get_rng_state().numpy().tobytes()


def test_building_a_tiny_model_leaves_the_random_generators_as_finding_it_cached_does(
    tmp_path: Path,
) -> None:
    """A run that builds the tiny model (cold cache) must go on drawing the same numbers (LoRA
    initialisation, dropout) as a run that finds it, or a command's first run differs from its
    reruns, a resumed one included."""
    from clintune.models.tiny import TinyModelSpec, ensure_tiny_model

    spec = TinyModelSpec(
        arch="llama",
        vocab_size=300,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        corpus=[str(REPO / "data" / "classification" / "val.jsonl")],
    )
    torch.manual_seed(5)
    ensure_tiny_model(spec, tmp_path)  # builds
    after_build = _generator_fingerprint()
    torch.manual_seed(5)
    ensure_tiny_model(spec, tmp_path)  # finds it
    assert _generator_fingerprint() == after_build


def test_the_dpo_reference_pass_leaves_the_random_generators_as_a_cache_hit_does() -> None:
    """The reference pass runs only when its log-probs are not cached; iterating its loader
    must not draw from the generator that training's dropout then uses."""
    from torch.utils.data import DataLoader

    from clintune.methods.dpo import precompute_reference_logps
    from clintune.tokenization import EncodedPair, collate_pairs

    model = micro_llama()
    pairs = [EncodedPair([1, 2, 3], [4, 5], [6]), EncodedPair([7, 8], [9], [10, 11, 12])]
    loader = DataLoader(pairs, batch_size=1, collate_fn=lambda rows: collate_pairs(rows, 0))
    torch.manual_seed(5)
    untouched = _generator_fingerprint()
    chosen, rejected, tokens = precompute_reference_logps(model, loader)
    assert chosen.shape == rejected.shape == (2,) and tokens > 0
    assert _generator_fingerprint() == untouched


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "seed", "trainer"),
    [(signal.SIGUSR2, 15, "ddp_cpu"), (signal.SIGTERM, 19, "fsdp_cpu")],
    ids=["SIGUSR2", "SIGTERM-fsdp"],
)
def test_a_signal_to_a_two_process_run_saves_once_and_the_rerun_resumes_on_both_ranks(
    tmp_path: Path, run_env, cache_dir: Path, signum: int, seed: int, trainer: str
) -> None:
    """SIGTERM reaches the ranks through torch's launcher; submitit's USR2 through ours. Under
    FSDP2 the checkpoint is sharded (one file per rank) and still one, complete."""
    args = [
        *ARGS,
        f"seed={seed}",
        f"trainer={trainer}",
        "method.train.batch_size=4",
        "checkpoint.every_n_steps=0",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    log = tmp_path / "run.log"
    process = _start(args, run_env, log)
    _wait_for(lambda: _training_started(log), "training to start", process)
    _past_fit_setup()
    process.send_signal(signum)  # to the launching process only
    process.wait(timeout=300)
    assert process.returncode == 143, log.read_text()
    assert f"stopped by {signal.Signals(signum).name} after saving" in log.read_text()
    assert len(_checkpoints(cache_dir)) == 1
    if trainer == "fsdp_cpu":
        (checkpoint,) = _checkpoints(cache_dir)
        # A link to one complete version: a shard per rank; no other version left beside it.
        assert checkpoint.is_symlink() and len(list(checkpoint.glob("*.distcp"))) == 2
        versions = [path.name for path in checkpoint.parent.glob("last.ckpt.*")]
        assert versions == [checkpoint.resolve().name]
    resumed = run_script("train.py", args, run_env)
    assert "Resuming" in resumed.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["compute/sft/resumed"] == 1.0
    assert metrics["compute/sft/optimizer_steps"] == 24  # 96 examples / (4 × 2 ranks) × 2
    assert not _checkpoints(cache_dir)
