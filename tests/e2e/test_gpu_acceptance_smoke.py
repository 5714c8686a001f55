"""scripts/gpu_acceptance.py --smoke: the GPU acceptance run, on CPU with tiny shapes, every
configuration through the real pipeline (QLoRA skipped: it needs CUDA), so that the script
cannot rot before a GPU runs it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import run_script


@pytest.mark.slow
def test_the_acceptance_script_runs_every_configuration_in_smoke_mode(
    tmp_path: Path, run_env
) -> None:
    result = run_script(
        "scripts/gpu_acceptance.py", ["--smoke", "--out-dir", str(tmp_path)], run_env
    )
    report = json.loads((tmp_path / "acceptance.json").read_text())
    rows = {row["name"]: row for row in report["results"]}
    assert {name for name, row in rows.items() if row["status"] == "skipped"} == {
        "qlora sft",
        "qlora dpo",
    }
    ran = [row for row in rows.values() if row["status"] != "skipped"]
    assert len(ran) == 6 and all(row["status"] == "ok" for row in ran)
    for row in ran:
        assert row["finite"] and math.isfinite(row["final_loss"]), row
        assert row["tokens_per_second"] > 0 and row["peak_memory_gb"] > 0, row
        assert row["mfu"] > 0, row
    assert rows["sft fsdp"]["processes"] == rows["dpo fsdp reference-copy"]["processes"] == 2
    assert rows["sft gpu bf16 sdpa"]["processes"] == 1
    # The random model carries Llama-3's vocabulary.
    assert report["model_shape"]["vocab_size"] == 128_256
    assert "sft fsdp" in result.stdout and "tokens/s" in result.stdout
