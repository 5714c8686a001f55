"""The first run on a new GPU machine: everything the CPU cannot check, in one command.

    python scripts/gpu_acceptance.py            # on the GPU machine (at most ~8 minutes)
    python scripts/gpu_acceptance.py --smoke    # the same script on CPU, tiny shapes (CI)

It needs no hub: it builds a random Llama-3.2-1B-shaped model (128,256-token vocabulary, about
1.2B parameters, tied embeddings) locally, with the tiny models' tokenizer, and trains it
through clintune's own pipeline (the composed Hydra config, ``pipeline.run``, evaluation
included) in each configuration:

- SFT and DPO in bf16-mixed on ``trainer=gpu``, SDPA attention;
- SFT with gradient checkpointing, and SFT with eager attention (against the SDPA row);
- ``trainer=fsdp`` (FSDP2) on every visible GPU: SFT, and DPO with a sharded reference copy;
- QLoRA (4-bit NF4 base, LoRA): SFT and DPO (installs the ``qlora`` extra when missing).

It prints one table, a row per configuration: steady tokens/s (after the first step, summed
over ranks), model FLOP utilisation (6N-style FLOPs per token, attention excluded, against
the bf16 matmul rate measured here on one GPU, times the processes), peak memory, the final
training loss and whether every loss was finite. The same goes to ``acceptance.json`` in the
output directory. It exits 1 when any configuration fails or loses finiteness.

``--smoke`` maps ``trainer=gpu`` to one CPU process (still bf16-mixed) and ``trainer=fsdp`` to
``fsdp_cpu`` (two gloo processes), shrinks the model (same vocabulary), and skips QLoRA, which
needs CUDA. Its figures mean nothing; it exists so that the script cannot rot.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import importlib
import json
import math
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Llama-3.2-1B's dimensions (its rope scaling aside): about 1.24B parameters.
LLAMA32_1B = {
    "vocab_size": 128_256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rope_theta": 500_000.0,
    "tie_word_embeddings": True,
    "max_position_embeddings": 2048,
}
# The same vocabulary (so the 128k LM head and its chunked log-probs are exercised), tiny
# otherwise: about 8M parameters, almost all embeddings.
SMOKE_SHAPE = {
    **LLAMA32_1B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
BUILD_MARKER = "clintune_acceptance_model.json"

QLORA = ("model.quantization=4bit", "model.lora.enabled=true")


@dataclasses.dataclass(frozen=True)
class Configuration:
    name: str
    method: str  # sft | dpo
    trainer: str  # gpu | fsdp (smoke: cpu | fsdp_cpu)
    overrides: tuple[str, ...] = ()
    qlora: bool = False

    @property
    def reference_in_loop(self) -> bool:
        """Whether each DPO step also runs the reference forward (copy, adapter off)."""
        return any(
            o.startswith("method.reference=") and "precompute" not in o for o in self.overrides
        )


CONFIGURATIONS = (
    Configuration("sft gpu bf16 sdpa", "sft", "gpu", ("model.attn_implementation=sdpa",)),
    Configuration("sft gpu bf16 eager", "sft", "gpu", ("model.attn_implementation=eager",)),
    Configuration("sft gpu bf16 grad-ckpt", "sft", "gpu", ("model.gradient_checkpointing=true",)),
    Configuration("dpo gpu bf16", "dpo", "gpu"),
    Configuration("sft fsdp", "sft", "fsdp"),
    Configuration("dpo fsdp reference-copy", "dpo", "fsdp", ("method.reference=copy",)),
    Configuration("qlora sft", "sft", "gpu", QLORA, qlora=True),
    Configuration(
        "qlora dpo", "dpo", "gpu", (*QLORA, "method.reference=adapter_disabled"), qlora=True
    ),
)


@dataclasses.dataclass
class Result:
    name: str
    status: str  # ok | failed | skipped
    detail: str = ""
    processes: int = 0
    tokens_per_second: float = math.nan
    mfu: float = math.nan
    peak_memory_gb: float = math.nan
    final_loss: float = math.nan
    finite: bool = False
    run_dir: str = ""


# ---- pure pieces (tested in tests/unit/test_gpu_acceptance.py)


def flops_per_token(parameters: float, trainable: float, reference_in_loop: bool) -> float:
    """Training FLOPs per token as ``clintune.compute`` counts them (forward 2N, backward
    2N + 2N_trainable), plus a reference forward (2N) when DPO runs one at every step."""
    return 4 * parameters + 2 * trainable + (2 * parameters if reference_in_loop else 0)


def model_flop_utilisation(
    tokens_per_second: float, per_token: float, matmul_flops: float, processes: int
) -> float:
    return tokens_per_second * per_token / (matmul_flops * max(processes, 1))


def training_losses(run_dir: Path) -> list[float]:
    """Every logged ``train/loss`` of a run (its stage's CSV log), in order."""
    rows = csv.DictReader((run_dir / "logs" / "metrics.csv").open())
    return [float(row["train/loss"]) for row in rows if row.get("train/loss")]


def exit_status(results: list[Result]) -> int:
    """1 when any configuration failed or any ran with a non-finite loss; skips do not count."""
    return int(any(r.status == "failed" or (r.status == "ok" and not r.finite) for r in results))


def _number(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


def format_table(results: list[Result]) -> str:
    header = ("configuration", "status", "procs", "tokens/s", "MFU", "peak GB", "loss", "finite")
    lines = [header]
    for r in results:
        lines.append(
            (
                r.name,
                r.status,
                str(r.processes or "-"),
                _number(r.tokens_per_second, ",.0f"),
                _number(r.mfu * 100, ".1f") + ("%" if not math.isnan(r.mfu) else ""),
                _number(r.peak_memory_gb, ".2f"),
                _number(r.final_loss, ".4f"),
                ("yes" if r.finite else "NO") if r.status == "ok" else "-",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    for r in results:
        if r.detail and r.status != "ok":
            out.append(f"{r.name}: {r.detail}")
    return "\n".join(out)


# ---- measuring and building


def matmul_flops(device: str, seconds: float = 1.0) -> float:
    """The bf16 matmul rate (FLOP/s) this device sustains on large square products."""
    import torch

    size = 8192 if device == "cuda" else 512
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        a @ b
    sync()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(10):
            a @ b
        count += 10
        sync()
    return 2 * size**3 * count / (time.perf_counter() - started)


def _compose(overrides: list[str], cache_dir: Path) -> Any:
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root = str(REPO)
        cfg.paths.cache_dir = str(cache_dir)
    return cfg


def build_random_model(shape: dict[str, Any], cache_dir: Path, device: str) -> Path:
    """A randomly initialised Llama of ``shape`` with the tiny models' tokenizer and chat
    template, saved once (bf16) under ``<cache>/acceptance/``."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from clintune.io import build_directory_once, content_hash
    from clintune.models.loading import resolve_source

    tokenizer_source = resolve_source(_compose(["model=tiny_llama"], cache_dir).model, cache_dir)
    identity = {"shape": shape, "tokenizer": Path(tokenizer_source).name, "seed": 0}

    def build(staging: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        ids = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**shape, **ids))
        model.generation_config = GenerationConfig(**ids, do_sample=False)
        model.to(torch.bfloat16).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        parameters = sum(p.numel() for p in model.parameters())
        (staging / BUILD_MARKER).write_text(json.dumps({**identity, "parameters": parameters}))

    key = content_hash(identity, 16)
    return build_directory_once(cache_dir / "acceptance" / key, BUILD_MARKER, build)


def ensure_bitsandbytes() -> str | None:
    """None when bitsandbytes is importable (installing the ``qlora`` extra if needed), else
    why not."""
    from clintune.models.loading import installed_bitsandbytes

    if installed_bitsandbytes() is not None:
        return None
    print("bitsandbytes is missing: installing the qlora extra", flush=True)
    command = [sys.executable, "-m", "pip", "install", "-c", "constraints.txt", "-e", ".[qlora]"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    importlib.invalidate_caches()
    if done.returncode != 0 or installed_bitsandbytes() is None:
        return (
            "could not install the qlora extra: " + (done.stderr.strip().splitlines() or ["?"])[-1]
        )
    return None


# ---- running


def _overrides(config: Configuration, model_dir: Path, smoke: bool) -> list[str]:
    steps, batch = (3, 2) if smoke else (30, 8)
    if config.method == "dpo":
        batch = max(1, batch // 2)  # pairs: two sequences each
    trainer = config.trainer
    if smoke:
        trainer = {"gpu": "cpu", "fsdp": "fsdp_cpu"}[trainer]
    overrides = [
        "model=tiny_llama",
        "model.name=random_llama32_1b",
        "model.tiny=null",
        f"model.pretrained={model_dir}",
        "model.dtype=bfloat16",  # as the study's models load, with their learning rates
        "model.learning_rate=1e-5",
        "model.dpo_learning_rate=5e-7",
        "model.max_length=512",
        "task=classification",
        f"trainer={trainer}",
        "trainer.log_every_n_steps=1",
        "logger=none",
        "seed=0",
        "stages.reuse=false",
        "stages.resume=false",
        "checkpoint.every_n_steps=0",
        f"subsample.train={steps * batch * 8}",
        f"subsample.val={batch}",
        "eval.limit=4",
        "eval.bootstrap.samples=10",
        "eval.progress_bar=false",
        f"method.train.max_steps={steps}",
        f"method.train.batch_size={batch}",
        f"method.train.eval_batch_size={batch}",
        "method.train.epochs=1",
        "method.save=last",
    ]
    if trainer in ("gpu", "cpu"):
        overrides.append("trainer.precision=bf16-mixed")
    if config.method == "dpo":
        overrides += ["method=dpo_only", "method.pairs.source=label"]
    else:
        overrides.append("method=sft")
    return [*overrides, *config.overrides]


def run_configuration(
    config: Configuration, model_dir: Path, out_dir: Path, smoke: bool, matmul: float
) -> Result:
    import torch

    from clintune import distributed
    from clintune.pipeline import run
    from clintune.settings import settings_from

    run_dir = out_dir / config.name.replace(" ", "-")
    result = Result(config.name, "ok", run_dir=str(run_dir))
    cache_dir = Path(os.environ.get("CLINTUNE_CACHE", Path.home() / ".cache" / "clintune"))
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        cfg = _compose(_overrides(config, model_dir, smoke), cache_dir)
        settings_from(cfg)
        metrics = distributed.launch(cfg, run_dir, run)
    except Exception as error:  # one configuration's failure is a row, not the end
        lines = str(error).strip().splitlines() or [""]
        return dataclasses.replace(
            result, status="failed", detail=f"{type(error).__name__}: {lines[0][:300]}"
        )
    stage = config.method
    processes = int(metrics[f"compute/{stage}/processes"])
    tokens_per_second = metrics[f"compute/{stage}/tokens_per_second"]
    per_token = flops_per_token(
        metrics[f"compute/{stage}/parameters"],
        metrics[f"compute/{stage}/trainable_parameters"],
        config.reference_in_loop,
    )
    losses = training_losses(run_dir)
    return dataclasses.replace(
        result,
        processes=processes,
        tokens_per_second=tokens_per_second,
        mfu=model_flop_utilisation(tokens_per_second, per_token, matmul, processes),
        peak_memory_gb=metrics[f"compute/{stage}/peak_memory_bytes"] / 2**30,
        final_loss=losses[-1] if losses else math.nan,
        finite=bool(losses) and all(math.isfinite(loss) for loss in losses),
        detail=f"{time.perf_counter() - started:.0f} s",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, no QLoRA (CI)")
    parser.add_argument("--out-dir", type=Path, help="default outputs/gpu_acceptance/<time>")
    parser.add_argument(
        "--only", action="append", default=[], help="run configurations whose name contains this"
    )
    args = parser.parse_args(argv)

    import torch

    started = time.perf_counter()
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA GPU visible; on a CPU machine run with --smoke", file=sys.stderr)
        return 2
    device = "cpu" if args.smoke else "cuda"
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out_dir = args.out_dir or REPO / "outputs" / "gpu_acceptance" / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(os.environ.get("CLINTUNE_CACHE", Path.home() / ".cache" / "clintune"))
    selected = [
        c for c in CONFIGURATIONS if not args.only or any(part in c.name for part in args.only)
    ]

    matmul = matmul_flops(device)
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    name = torch.cuda.get_device_name(0) if gpus else "cpu"
    print(f"device: {name} × {gpus or 1}; bf16 matmul {matmul / 1e12:.3g} TFLOP/s", flush=True)
    shape = SMOKE_SHAPE if args.smoke else LLAMA32_1B
    model_dir = build_random_model(shape, cache_dir, device)
    print(f"model: random Llama-3.2-1B shape {shape} at {model_dir}", flush=True)

    qlora_problem = "needs a CUDA GPU (--smoke)" if args.smoke else None
    results = []
    for config in selected:
        if config.qlora and qlora_problem is None and not args.smoke:
            qlora_problem = ensure_bitsandbytes() or ""
        if config.qlora and qlora_problem:
            status = "skipped" if args.smoke else "failed"
            results.append(Result(config.name, status, detail=qlora_problem))
            continue
        print(f"\n=== {config.name}", flush=True)
        result = run_configuration(config, model_dir, out_dir, args.smoke, matmul)
        print(f"=== {config.name}: {result.status} {result.detail}", flush=True)
        results.append(result)

    wall = time.perf_counter() - started
    print(f"\n{format_table(results)}\n\nwall time {wall:.0f} s; runs in {out_dir}")
    report = {
        "device": name,
        "gpus": gpus,
        "smoke": args.smoke,
        "bf16_matmul_flops": matmul,
        "model_shape": shape,
        "wall_seconds": wall,
        "torch": torch.__version__,
        "results": [dataclasses.asdict(r) for r in results],
    }
    (out_dir / "acceptance.json").write_text(json.dumps(report, indent=2, default=str))
    return exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
