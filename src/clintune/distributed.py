"""Several processes per job (DDP/FSDP), launched by torch.distributed's own elastic launcher.

Why not Lightning's launcher: it re-runs ``sys.argv`` in each child, which under a Hydra
multirun re-runs the whole sweep in every rank and gives each rank its own output directory.
Here the job's resolved config is handed to N spawned workers instead; they share the job's one
run directory, initialise the process group before anything else (Lightning then reuses it),
and only rank zero writes files or talks to W&B. The helpers below are no-ops in a single
process, so the same pipeline code runs in both."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from clintune.errors import TrainingInterrupted, UserError, preemption_signals

DISTRIBUTED_STRATEGIES = ("ddp", "fsdp", "deepspeed")


def _strategy_name(trainer_cfg: DictConfig) -> str:
    strategy = trainer_cfg.get("strategy", "auto")
    if isinstance(strategy, DictConfig):
        strategy = str(strategy.get("_target_", "")).rsplit(".", 1)[-1]
    return str(strategy).lower()


def processes_per_job(trainer_cfg: DictConfig) -> int:
    """How many processes this job trains with: ``trainer.devices`` for a distributed
    strategy, else one."""
    if not any(name in _strategy_name(trainer_cfg) for name in DISTRIBUTED_STRATEGIES):
        return 1
    devices = trainer_cfg.get("devices", 1)
    if devices in ("auto", -1, "-1"):
        devices = torch.cuda.device_count() if trainer_cfg.get("accelerator") == "gpu" else 1
    if not isinstance(devices, int) and not str(devices).isdigit():
        raise UserError(
            f"trainer.devices must be a number of devices for strategy "
            f"'{_strategy_name(trainer_cfg)}', got {devices!r}"
        )
    if int(trainer_cfg.get("num_nodes", 1) or 1) > 1:
        raise UserError(
            "trainer.num_nodes > 1 is not supported yet: one job runs on one machine "
            "(set trainer.devices to its number of GPUs)"
        )
    return int(devices)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_rank_zero() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


_rank_zero_first_depth = 0


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank zero runs the block first (building a cache entry), the other ranks after it,
    finding the entry done. Needed, not just tidy: transformers' ``save_pretrained`` silently
    writes nothing on a rank other than zero. Nested uses run inline."""
    global _rank_zero_first_depth
    if not is_initialized() or _rank_zero_first_depth:
        yield
        return
    if not is_rank_zero():
        barrier()
    _rank_zero_first_depth += 1
    try:
        yield
    finally:
        _rank_zero_first_depth -= 1
        if is_rank_zero():
            barrier()


def broadcast_from_rank_zero(value: Any) -> Any:
    """Rank zero's ``value`` on every rank (for decisions only rank zero may take, such as
    whether a cache entry exists)."""
    if not is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_to_all(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not is_initialized():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def shard_bounds(count: int, shards: int, index: int) -> tuple[int, int]:
    """Contiguous [start, end) of shard ``index`` of ``count`` items: sizes differ by at most
    one, and concatenating the shards in order gives back the items in order."""
    base, extra = divmod(count, shards)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def my_shard(items: list[Any]) -> list[Any]:
    start, end = shard_bounds(len(items), world_size(), rank())
    return items[start:end]


def device_for(trainer_cfg: DictConfig) -> torch.device:
    """This rank's device for work done outside the Trainer (sampling, reference pass,
    evaluation)."""
    if trainer_cfg.get("accelerator") == "gpu" and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _backend(accelerator: str) -> str:
    return "nccl" if accelerator == "gpu" and torch.cuda.is_available() else "gloo"


def _worker(
    job: Callable[[DictConfig, Path], Any],
    config: dict[str, Any],
    run_dir: str,
    error_dir: str,
) -> Any:
    cfg = OmegaConf.create(config)
    backend = _backend(str(cfg.trainer.get("accelerator", "cpu")))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        # Ranks share the machine's cores rather than each oversubscribing all of them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    dist.init_process_group(backend=backend)
    try:
        result = job(cfg, Path(run_dir))
        return result if dist.get_rank() == 0 else None
    except UserError as error:
        # The launcher only reports that a worker failed; the message comes back this way.
        Path(error_dir, f"rank{dist.get_rank()}.txt").write_text(str(error))
        raise
    except TrainingInterrupted as interrupted:
        Path(error_dir, "interrupted").write_text(f"{interrupted.signum}\n{interrupted.checkpoint}")
        raise
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launch(cfg: DictConfig, run_dir: Path, job: Callable[[DictConfig, Path], Any]) -> Any:
    """``job(cfg, run_dir)`` in this process, or in ``trainer.devices`` spawned ranks sharing
    ``run_dir``; returns rank zero's result. ``job`` must be importable (spawned workers)."""
    processes = processes_per_job(cfg.trainer)
    if processes <= 1 or is_initialized():
        return job(cfg, run_dir)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = OmegaConf.to_container(cfg, resolve=True)
    launch_config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=f"clintune-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{_free_port()}",
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
    )
    # The launcher passes SIGTERM on to the ranks itself, but not submitit's preemption signal
    # (USR2): forward it, so the ranks save before submitit requeues the job.
    forwarded = [signum for signum in preemption_signals() if signum != signal.SIGTERM]
    previous = {signum: signal.signal(signum, _forward_to_ranks) for signum in forwarded}
    with tempfile.TemporaryDirectory(prefix="clintune-ranks-") as error_dir:
        try:
            results = elastic_launch(launch_config, _worker)(job, config, str(run_dir), error_dir)
        except (ChildFailedError, SignalException) as error:
            interrupted = Path(error_dir, "interrupted")
            if interrupted.is_file():
                signum, checkpoint = interrupted.read_text().split("\n", 1)
                raise TrainingInterrupted(int(signum), Path(checkpoint)) from error
            messages = sorted(Path(error_dir).glob("rank*.txt"))
            if messages:
                raise UserError(messages[0].read_text()) from error
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    return results[0]


def _forward_to_ranks(signum: int, frame: Any) -> None:
    import psutil

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(signum)
