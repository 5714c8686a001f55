"""scripts/gpu_acceptance.py's arithmetic and verdict (its whole run on CPU, --smoke, is
tests/e2e/test_gpu_acceptance.py)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO


def _script():
    spec = importlib.util.spec_from_file_location(
        "gpu_acceptance", REPO / "scripts/gpu_acceptance.py"
    )
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["gpu_acceptance"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


acceptance = _script()
Result = acceptance.Result


def test_the_model_is_llama_3_2_1b_shaped_with_the_128k_vocabulary() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**acceptance.LLAMA32_1B))
    # Llama-3.2-1B: 1,235,814,400 parameters (tied embeddings).
    assert sum(p.numel() for p in model.parameters()) == 1_235_814_400
    assert acceptance.SMOKE_SHAPE["vocab_size"] == 128_256


def test_flops_per_token_and_utilisation() -> None:
    assert acceptance.flops_per_token(10, 10, False) == 60  # full fine-tuning: 6N
    assert acceptance.flops_per_token(10, 1, False) == 42  # LoRA: 4N + 2N_trainable
    assert acceptance.flops_per_token(10, 10, True) == 80  # plus the reference's forward
    # 1,000 tokens/s × 6e9 FLOPs per token on 2 devices of 1e13 FLOP/s each: 30%.
    assert acceptance.model_flop_utilisation(1000, 6e9, 1e13, 2) == pytest.approx(0.3)
    copy = next(c for c in acceptance.CONFIGURATIONS if "reference-copy" in c.name)
    assert copy.reference_in_loop
    assert not next(
        c for c in acceptance.CONFIGURATIONS if c.name == "dpo gpu bf16"
    ).reference_in_loop


def test_any_failure_or_non_finite_loss_fails_the_run_and_skips_do_not() -> None:
    ok = Result("a", "ok", finite=True, final_loss=1.0)
    assert acceptance.exit_status([ok, Result("q", "skipped", detail="needs CUDA")]) == 0
    assert acceptance.exit_status([ok, Result("b", "failed", detail="OOM")]) == 1
    assert acceptance.exit_status([ok, Result("c", "ok", finite=False, final_loss=math.nan)]) == 1
    table = acceptance.format_table([ok, Result("b", "failed", detail="OutOfMemoryError: …")])
    assert table.splitlines()[0].split() == [
        "configuration",
        "status",
        "procs",
        "tokens/s",
        "MFU",
        "peak",
        "GB",
        "loss",
        "finite",
    ]
    assert "b: OutOfMemoryError: …" in table


def test_final_loss_comes_from_the_runs_training_log(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "metrics.csv").write_text(
        "epoch,step,train/loss,train/lr\n0,0,2.5,\n0,0,,0.1\n0,1,2.25,\n"
    )
    assert acceptance.training_losses(tmp_path) == [2.5, 2.25]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_a_gpu_it_asks_for_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    assert acceptance.main([]) == 2
    assert "--smoke" in capsys.readouterr().err
