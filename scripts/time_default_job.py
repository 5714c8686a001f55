"""Benchmark (not a test): wall time of the default job, `python train.py`, from a cold cache.

    python scripts/time_default_job.py [extra Hydra overrides]

Builds the tiny model from scratch in a fresh cache directory, trains, evaluates, and prints
the wall time and the headline metric. README quotes what this prints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(scratch) / "run"
        env = {**os.environ, "CLINTUNE_CACHE": str(Path(scratch) / "cache")}
        command = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *sys.argv[1:]]
        started = time.perf_counter()
        subprocess.run(command, cwd=REPO, env=env, check=True)
        wall = time.perf_counter() - started
        metrics = json.loads((run_dir / "metrics.json").read_text())
    print("\n=== default job (cold cache) ===")
    print(f"wall seconds          {wall:8.1f}")
    print(f"train seconds         {metrics['compute/train_seconds']:8.1f}")
    print(f"eval seconds          {metrics['compute/eval_seconds']:8.1f}")
    print(f"cpu threads           {os.cpu_count():8d}")
    for key in sorted(k for k in metrics if k.startswith("test/") and "_ci_" not in k):
        if not key.endswith("_n"):
            print(f"{key:<24}{metrics[key]:8.4f}")


if __name__ == "__main__":
    main()
