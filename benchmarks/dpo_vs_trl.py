"""Benchmark: clintune's DPO and SFT against TRL's DPOTrainer and SFTTrainer, one invocation;
and clintune's ORPO, SimPO, KTO and RPO, timed per example relative to its SFT.

Both implementations train the same tiny model (loaded with ``from_pretrained`` from the
directory the project's builder makes), on the same preference pairs (label pairs from the
shipped classification data, made by ``build_pairs``), with the same token sequences, batch
size, batch order, optimiser, learning rate, clipping, precision and thread count. Every
configuration runs in a fresh subprocess of this script (``--worker``), one after the other,
so each one's peak resident set size is its own; the parent prints a Markdown table.

    python benchmarks/dpo_vs_trl.py [--pairs 128] [--batch-size 8] [--threads N]
                                    [--max-length 512] [--repeats 1] [--out results.json]
                                    [--vocab-size 128256] [--prompt-tokens 1024]

This is a benchmark, not a test: it asserts nothing about speed. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
IMPLEMENTATIONS = ("ours", "trl")
# Timed for clintune only: their time per example relative to SFT (no TRL peer is run).
OURS_ONLY = ("orpo", "simpo", "kto", "rpo")
METHODS = ("sft", "dpo-precompute", "dpo-copy", *OURS_ONLY)
REFERENCE = {
    "sft": "-",
    "dpo-precompute": "precomputed",
    "dpo-copy": "model copy",
    "orpo": "none",
    "simpo": "none",
    "kto": "precomputed",
    "rpo": "precomputed",
}
# What one "example" is: a pair, or for KTO one thumbs-up/down example (two per pair).
UNIT = {"sft": "examples", "kto": "examples"}


# ----------------------------------------------------------------------------- shared set-up


def _peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _matmul_params(model: Any) -> dict[str, int]:
    """Parameters that take part in matrix products, split into the body (every layer) and the
    LM head; the input embedding (a lookup) is left out."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    untied_head = 0 if head is embedding else head.numel()
    return {
        "body_params": total - embedding.numel() - untied_head,
        "head_params": head.numel(),
    }


def measure_matmul_gflops(threads: int, size: int = 2048, seconds: float = 3.0) -> float:
    """The float32 matrix-multiply rate of this machine at ``threads`` threads: the ceiling
    the training runs are measured against."""
    import torch

    torch.set_num_threads(threads)
    left, right = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        left @ right
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        left @ right
        runs += 1
    return 2 * size**3 * runs / elapsed / 1e9


def _compose(model: str, cache_dir: str, method: str = "dpo") -> Any:
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[f"model={model}", "task=classification", f"method={method}", "logger=none"],
        )
    with open_dict(cfg):
        cfg.paths.root = str(REPO)
        cfg.paths.cache_dir = cache_dir
    return cfg


def _setup(args: argparse.Namespace) -> dict[str, Any]:
    """The config, model, tokenizer and the first ``args.pairs`` label pairs."""
    import torch
    from hydra.utils import instantiate

    from clintune.methods.preferences import build_pairs
    from clintune.models.loading import load_model

    torch.manual_seed(args.seed)
    cfg = _compose(args.model, args.cache_dir)
    loaded = load_model(cfg.model, args.cache_dir)
    task = instantiate(cfg.task)
    train = task.load_split("train")
    pairs, _ = build_pairs(task, train, source="label", seed=int(cfg.method.pairs.seed))
    if len(pairs) < args.pairs:
        raise SystemExit(f"only {len(pairs)} pairs in the training split, asked for {args.pairs}")
    pairs = pairs[: args.pairs]
    model = loaded.model.float().train()
    if args.vocab_size:
        # The study's vocabulary on the tiny model: an embedding and LM head with that many
        # rows (the extra ones random, seeded), while the trained tokenizer stays small.
        torch.manual_seed(args.seed)
        model.resize_token_embeddings(args.vocab_size, mean_resizing=False)
    if args.prompt_tokens:
        notes = [str(record["text"]) for record in train]
        pairs = [
            _lengthen_prompt(pair, notes, index, loaded.tokenizer, args.prompt_tokens)
            for index, pair in enumerate(pairs)
        ]
    return {"cfg": cfg, "model": model, "tokenizer": loaded.tokenizer, "pairs": pairs}


def _lengthen_prompt(pair: Any, notes: list[str], index: int, tokenizer: Any, target: int) -> Any:
    """The pair with earlier notes of the shipped data put before its own, until its prompt
    has about ``target`` tokens: a long clinical history, as in the study's prompts."""
    import dataclasses

    from clintune.tokenization import encode_prompt

    content = pair.messages[-1]["content"]
    history: list[str] = []
    while True:
        text = "\n\n".join(["Earlier notes:", *history, "Current note:", content])
        messages = [*pair.messages[:-1], {**pair.messages[-1], "content": text}]
        if len(encode_prompt(tokenizer, messages)) >= target:
            return dataclasses.replace(pair, messages=messages)
        history.append(notes[(index + len(history) + 1) % len(notes)])


def _our_encodings(setup: dict[str, Any], max_length: int, sft: bool) -> list[Any]:
    from clintune.tokenization import encode_example, encode_pair

    tok = setup["tokenizer"]
    if sft:
        return [encode_example(tok, p.messages, p.chosen, max_length) for p in setup["pairs"]]
    return [encode_pair(tok, p.messages, p.chosen, p.rejected, max_length) for p in setup["pairs"]]


def _kto_encodings(setup: dict[str, Any], max_length: int) -> tuple[list[Any], list[bool]]:
    """KTO's examples from the pairs as the stage derives them (chosen desirable, rejected
    undesirable), each with a mismatched completion for the KL estimate."""
    from clintune.methods.preferences import mismatched_completions, unpaired_from_pairs
    from clintune.tokenization import encode_pair

    unpaired = unpaired_from_pairs(setup["pairs"])
    mismatched = mismatched_completions(unpaired, seed=0)
    encoded = [
        encode_pair(setup["tokenizer"], u.messages, u.completion, other, max_length)
        for u, other in zip(unpaired, mismatched, strict=True)
    ]
    return encoded, [u.desirable for u in unpaired]


def _token_counts(
    encoded: list[Any], batch_size: int, sft: bool, shared_prompt: bool = False
) -> dict[str, int]:
    """Tokens the forward passes see per epoch (real, and with padding), batches taken in
    order as both loaders do here. ``shared_prompt``: each prompt once, then both answers."""
    real = padded = 0
    scored = sum(
        len(e.completion_ids) if sft else len(e.chosen_ids) + len(e.rejected_ids) for e in encoded
    )
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        if sft:
            rows = [len(e.prompt_ids) + len(e.completion_ids) for e in batch]
            real += sum(rows)
            padded += max(rows) * len(rows)
        elif shared_prompt:
            prompts = [len(p.prompt_ids) for p in batch]
            answers = [len(p.chosen_ids) for p in batch] + [len(p.rejected_ids) for p in batch]
            real += sum(prompts) + sum(answers)
            padded += max(prompts) * len(prompts) + max(answers) * len(answers)
        else:
            rows = [len(p.prompt_ids) + len(p.chosen_ids) for p in batch]
            rows += [len(p.prompt_ids) + len(p.rejected_ids) for p in batch]
            real += sum(rows)
            padded += max(rows) * len(rows)
    return {"tokens": real, "padded_tokens": padded, "scored_tokens": scored}


def _timing(timer: Any, warmup: int) -> dict[str, float]:
    """Wall and process CPU seconds per step from the step-start stamps to the last step's
    end, leaving out the first ``warmup`` steps."""
    starts, end = timer.starts, timer.end
    steps = len(starts)
    if end is None or steps <= warmup:
        raise RuntimeError(f"only {steps} steps ran; need more than --warmup-steps={warmup}")
    timed = steps - warmup
    return {
        "steps": steps,
        "timed_steps": timed,
        "timed_seconds": end - starts[warmup],
        "fit_seconds": end - starts[0],
        "s_per_step": (end - starts[warmup]) / timed,
        "cpu_s_per_step": (timer.cpu_end - timer.cpu_starts[warmup]) / timed,
    }


# ----------------------------------------------------------------------------- clintune worker


def _share_prompt(args: argparse.Namespace, cfg: Any) -> bool:
    """Whether our DPO runs each prompt once for both answers: ``--share-prompt``, or
    ``method.share_prompt`` from the config."""
    if args.share_prompt == "config":
        return bool(cfg.method.get("share_prompt", True))
    return args.share_prompt == "true"


def _precompute(
    model: Any, encoded: list[Any], args: argparse.Namespace, collate: Any, pad_id: int
) -> tuple[list[float], list[float], float]:
    """Reference log-probs of every pair as the stage precomputes them, and the seconds."""
    from functools import partial

    from torch.utils.data import DataLoader

    from clintune.methods.dpo import precompute_reference_logps

    started = time.perf_counter()
    loader = DataLoader(
        encoded,  # type: ignore[arg-type]
        batch_size=args.ref_batch_size,
        collate_fn=partial(collate, pad_token_id=pad_id),
    )
    chosen, rejected, _ = precompute_reference_logps(model, loader)
    return chosen.tolist(), rejected.tolist(), time.perf_counter() - started


def _run_ours(args: argparse.Namespace, method: str, result: dict[str, Any]) -> None:
    from functools import partial

    import lightning as L
    import torch
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader

    from clintune import stages
    from clintune.methods.dpo import DPOModule
    from clintune.methods.sft import SFTModule
    from clintune.tokenization import collate_sft

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.cpu_starts: list[float] = []
            self.end: float | None = None
            self.cpu_end = 0.0
            self.losses: list[float] = []

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, idx: int) -> None:
            self.starts.append(time.perf_counter())
            self.cpu_starts.append(time.process_time())

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, *rest: Any) -> None:
            self.end = time.perf_counter()
            self.cpu_end = time.process_time()
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss))

    L.seed_everything(args.seed, verbose=False)
    setup = _setup(args)
    result["rss_loaded_mb"] = _peak_rss_mb()
    result.update(_matmul_params(setup["model"]))
    cfg, model, tokenizer = setup["cfg"], setup["model"], setup["tokenizer"]
    pad_id = tokenizer.pad_token_id
    sft = method == "sft"
    desirable: list[bool] = []
    if method == "kto":
        encoded, desirable = _kto_encodings(setup, args.max_length)
    else:
        encoded = _our_encodings(setup, args.max_length, sft)
    shared = _share_prompt(args, cfg) if not sft else None
    result["share_prompt"] = shared
    result.update(_token_counts(encoded, args.batch_size, sft, bool(shared)))
    result["truncated"] = sum(e.truncated for e in encoded)
    result["examples"] = len(encoded)
    steps = len(encoded) // args.batch_size
    precompute_seconds = 0.0

    if sft:
        sft_cfg = cfg.method.sft.module
        module: L.LightningModule = SFTModule(
            model,
            learning_rate=float(sft_cfg.learning_rate),
            weight_decay=float(sft_cfg.weight_decay),
            warmup_ratio=float(sft_cfg.warmup_ratio),
        )
        loader = DataLoader(
            encoded,  # type: ignore[arg-type]
            batch_size=args.batch_size,
            shuffle=False,
            collate_fn=partial(collate_sft, pad_token_id=pad_id),
        )
    elif method.startswith("dpo"):
        dpo_cfg = cfg.method.module
        reference = "precompute" if method == "dpo-precompute" else "copy"
        # The layout the stage code uses: concatenated rows, or one prompt pass shared by both
        # completions.
        pair_collate = stages.pair_collate(bool(shared))
        reference_model = None
        if reference == "precompute":
            chosen, rejected, precompute_seconds = _precompute(
                model, encoded, args, pair_collate, pad_id
            )
            items = list(zip(encoded, chosen, rejected, strict=True))
        else:
            reference_model = copy.deepcopy(model)
            items = [(pair, 0.0, 0.0) for pair in encoded]
        module = DPOModule(
            model,
            learning_rate=float(dpo_cfg.learning_rate),
            beta=float(dpo_cfg.beta),
            loss_type=str(dpo_cfg.loss_type),
            label_smoothing=float(dpo_cfg.label_smoothing),
            reference=reference,
            reference_model=reference_model,
            weight_decay=float(dpo_cfg.weight_decay),
            warmup_ratio=float(dpo_cfg.warmup_ratio),
        )
        loader = DataLoader(
            items,
            batch_size=args.batch_size,
            shuffle=False,
            collate_fn=partial(
                stages.collate_with_reference, pad_token_id=pad_id, share_prompt=bool(shared)
            ),
        )

    elif method in OURS_ONLY:
        # The method's own config (conf/method/<method>.yaml), as train.py would compose it.
        from omegaconf import OmegaConf

        method_cfg = _compose(args.model, args.cache_dir, method).method
        reference = method_cfg.get("reference")
        pair_collate = stages.pair_collate(bool(shared))
        columns: list[list[Any]] = [encoded, [0.0] * len(encoded), [0.0] * len(encoded)]
        if reference == "precompute":
            chosen, rejected, precompute_seconds = _precompute(
                model, encoded, args, pair_collate, pad_id
            )
            columns[1:] = [chosen, rejected]
        if desirable:
            columns.append(desirable)
        items = list(zip(*columns, strict=True))
        references = {"reference": reference} if reference else {}
        module_cfg = OmegaConf.to_container(method_cfg.module, resolve=True)
        module = instantiate(module_cfg, model=model, **references)
        steps = len(items) // args.batch_size
        loader = DataLoader(
            items,
            batch_size=args.batch_size,
            shuffle=False,
            collate_fn=partial(
                stages.collate_with_reference, pad_token_id=pad_id, share_prompt=bool(shared)
            ),
        )
    timer = StepTimer()
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        logger=False,
        callbacks=[timer],
        max_epochs=1,
        max_steps=steps,
        accumulate_grad_batches=1,
        gradient_clip_val=1.0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    if trainer.precision not in ("32-true", "32"):
        raise SystemExit(f"trainer precision is {trainer.precision}; the benchmark compares fp32")
    trainer.fit(module, train_dataloaders=loader)
    result.update(_timing(timer, args.warmup_steps))
    result["precompute_seconds"] = precompute_seconds
    result["learning_rate"] = module.learning_rate
    # Mean over steps of the step loss, as TRL's ``training_loss``.
    result["mean_train_loss"] = statistics.fmean(timer.losses)
    result["threads"] = torch.get_num_threads()


# ----------------------------------------------------------------------------- TRL worker


def _run_trl(args: argparse.Namespace, method: str, result: dict[str, Any]) -> None:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from clintune.tokenization import completion_text, prompt_text

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.cpu_starts: list[float] = []
            self.end: float | None = None
            self.cpu_end = 0.0

        def on_step_begin(self, *unused: Any, **kwargs: Any) -> None:
            self.starts.append(time.perf_counter())
            self.cpu_starts.append(time.process_time())

        def on_step_end(self, *unused: Any, **kwargs: Any) -> None:
            self.end = time.perf_counter()
            self.cpu_end = time.process_time()

    precompute = {"seconds": 0.0}

    class TimedDPOTrainer(DPOTrainer):
        # TRL precomputes reference log-probs inside __init__; time just that part.
        def _precompute_ref_logps(self, *a: Any, **kw: Any) -> Any:
            started = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*a, **kw)
            finally:
                precompute["seconds"] += time.perf_counter() - started

    setup = _setup(args)
    result["rss_loaded_mb"] = _peak_rss_mb()
    result.update(_matmul_params(setup["model"]))
    cfg, model, tokenizer = setup["cfg"], setup["model"], setup["tokenizer"]
    sft = method == "sft"
    ours = _our_encodings(setup, args.max_length, sft)
    steps = len(ours) // args.batch_size
    # Pre-templated text: the prompt as the chat template renders it with the generation
    # prompt, each completion as clintune renders the assistant turn (ending in the EOS).
    rows = []
    for pair in setup["pairs"]:
        row = {
            "prompt": prompt_text(tokenizer, pair.messages),
            "chosen": completion_text(tokenizer, pair.messages, pair.chosen),
        }
        if sft:
            row["completion"] = row.pop("chosen")
        else:
            row["rejected"] = completion_text(tokenizer, pair.messages, pair.rejected)
        rows.append(row)
    dataset = Dataset.from_list(rows)
    common = {
        "output_dir": tempfile.mkdtemp(prefix="clintune-bench-trl-"),
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": 1,
        "num_train_epochs": 1,
        "max_steps": steps,
        "max_length": args.max_length,
        "padding_free": False,
        "optim": "adamw_torch",  # torch.optim.AdamW with its defaults, as clintune
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-8,
        "max_grad_norm": 1.0,
        "lr_scheduler_type": "cosine",
        "train_sampling_strategy": "sequential",
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": False,
        "eval_strategy": "no",
        "save_strategy": "no",
        "logging_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": args.seed,
        "data_seed": args.seed,
    }
    timer = StepTimer()
    if sft:
        sft_cfg = cfg.method.sft.module
        lr = float(sft_cfg.learning_rate)
        config = SFTConfig(
            **common,
            learning_rate=lr,
            weight_decay=float(sft_cfg.weight_decay),
            warmup_steps=int(float(sft_cfg.warmup_ratio) * steps),
            completion_only_loss=True,
            packing=False,
        )
        trainer: Any = SFTTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        theirs = [
            (row["input_ids"], sum(label != -100 for label in row["labels"]))
            for row in trainer.train_dataset
        ]
        mine = [(e.prompt_ids + e.completion_ids, len(e.completion_ids)) for e in ours]
    else:
        dpo_cfg = cfg.method.module
        lr = float(dpo_cfg.learning_rate)
        precomputed = method == "dpo-precompute"
        config = DPOConfig(
            **common,
            learning_rate=lr,
            weight_decay=float(dpo_cfg.weight_decay),
            warmup_steps=int(float(dpo_cfg.warmup_ratio) * steps),
            beta=float(dpo_cfg.beta),
            loss_type=[str(dpo_cfg.loss_type)],
            label_smoothing=float(dpo_cfg.label_smoothing),
            precompute_ref_log_probs=precomputed,
            precompute_ref_batch_size=args.ref_batch_size,
        )
        trainer = TimedDPOTrainer(
            model=model,
            ref_model=None if precomputed else copy.deepcopy(model),
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        theirs = [
            (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])
            for row in trainer.train_dataset
        ]
        mine = [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in ours]
    result["identical_sequences"] = sum(a == b for a, b in zip(theirs, mine, strict=False))
    result["compared_sequences"] = len(mine)
    # TRL's own token counts, from its ids (its collators pad rows to the batch's longest).
    if sft:
        as_encoded = [SimpleNamespace(prompt_ids=ids, completion_ids=[]) for ids, _ in theirs]
    else:
        as_encoded = [
            SimpleNamespace(prompt_ids=p, chosen_ids=c, rejected_ids=r) for p, c, r in theirs
        ]
    result.update(_token_counts(as_encoded, args.batch_size, sft))
    try:
        train_output = trainer.train()
    finally:
        shutil.rmtree(common["output_dir"], ignore_errors=True)
    result.update(_timing(timer, args.warmup_steps))
    result["precompute_seconds"] = precompute["seconds"]
    result["learning_rate"] = lr
    result["mean_train_loss"] = float(train_output.training_loss)
    result["threads"] = torch.get_num_threads()


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.worker == "matmul":
        rate = measure_matmul_gflops(args.threads)
        Path(args.result_file).write_text(json.dumps({"matmul_gflops": rate}))
        return
    impl, method = args.worker.split(":")
    result: dict[str, Any] = {"implementation": impl, "method": method}
    (_run_ours if impl == "ours" else _run_trl)(args, method, result)
    result["peak_rss_mb"] = _peak_rss_mb()
    Path(args.result_file).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- parent


def worker_env(threads: int) -> dict[str, str]:
    """A worker's environment: ``threads`` threads, offline, quiet."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
        TQDM_DISABLE="1",
        WANDB_MODE="disabled",
        PYTHONWARNINGS="ignore",
    )
    return env


def _run_worker(args: argparse.Namespace, name: str) -> dict[str, Any]:
    env = worker_env(args.threads)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_file = handle.name
    forwarded = [
        f"--{key.replace('_', '-')}={getattr(args, key)}"
        for key in (
            "pairs",
            "batch_size",
            "ref_batch_size",
            "threads",
            "max_length",
            "warmup_steps",
            "seed",
            "share_prompt",
            "model",
            "cache_dir",
            "vocab_size",
            "prompt_tokens",
        )
    ]
    command = [sys.executable, __file__, f"--worker={name}", f"--result-file={result_file}"]
    started = time.perf_counter()
    proc = subprocess.run(
        command + forwarded, cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - started
    try:
        if proc.returncode != 0:
            raise SystemExit(
                f"worker {name} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}"
                f"\n--- stderr ---\n{proc.stderr[-6000:]}"
            )
        result = json.loads(Path(result_file).read_text())
    finally:
        Path(result_file).unlink(missing_ok=True)
    result["process_seconds"] = wall
    return result


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def model_gflops_per_step(row: dict[str, Any], method: str, batch_size: int, pairs: int) -> float:
    """Useful model FLOPs of one training step, the way MFU counts them: 6 per body parameter
    per token the step's forward passes see (padding excluded; each implementation is credited
    its own tokens), and 6 per LM-head parameter per scored token (the head's work the loss
    needs, whether or not an implementation also runs it elsewhere); 8 instead of 6 with a
    reference model's forward pass (``dpo-copy``)."""
    batches_per_epoch = -(-pairs // batch_size)
    per_param = 6 + (2 if method == "dpo-copy" else 0)
    flops = row["body_params"] * row["tokens"] + row["head_params"] * row["scored_tokens"]
    return per_param * flops / batches_per_epoch / 1e9


def summarise(
    results: list[dict[str, Any]], args: argparse.Namespace, matmul_gflops: float | None = None
) -> dict[str, Any]:
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for impl in IMPLEMENTATIONS:
        for method in args.methods:
            runs = [r for r in results if r["implementation"] == impl and r["method"] == method]
            if not runs:
                continue
            s_step = _median(runs, "s_per_step")
            per_step = [r["s_per_step"] for r in runs]
            precompute = _median(runs, "precompute_seconds")
            steps = runs[0]["steps"]
            examples = steps * args.batch_size
            rows[impl, method] = {
                "s_per_step": s_step,
                "s_per_step_range": [min(per_step), max(per_step)],
                "cpu_s_per_step": _median(runs, "cpu_s_per_step"),
                "examples_per_s": args.batch_size / s_step,
                "precompute_seconds": precompute,
                "examples_per_s_with_reference": examples / (precompute + steps * s_step),
                "peak_rss_mb": _median(runs, "peak_rss_mb"),
                "rss_growth_mb": _median(runs, "peak_rss_mb") - _median(runs, "rss_loaded_mb"),
                "tokens": runs[0]["tokens"],
                "examples": runs[0].get("examples"),
                "padded_tokens": runs[0]["padded_tokens"],
                "identical_sequences": runs[0].get("identical_sequences"),
                "compared_sequences": runs[0].get("compared_sequences"),
                "mean_train_loss": _median(runs, "mean_train_loss"),
                "learning_rate": runs[0]["learning_rate"],
                "steps": steps,
                "timed_steps": runs[0]["timed_steps"],
                "threads": runs[0]["threads"],
                "share_prompt": runs[0].get("share_prompt"),
                "repeats": len(runs),
            }
            if "head_params" in runs[0]:
                row = rows[impl, method]
                for key in ("body_params", "head_params", "scored_tokens"):
                    row[key] = runs[0][key]
                gflops = model_gflops_per_step(row, method, args.batch_size, args.pairs) / s_step
                row["model_gflops_per_s"] = gflops
                row["fraction_of_matmul_rate"] = gflops / matmul_gflops if matmul_gflops else None
    return {
        "rows": {f"{i}/{m}": v for (i, m), v in rows.items()},
        "_keys": rows,
        "matmul_gflops": matmul_gflops,
    }


def _gflops_cells(row: dict[str, Any]) -> str:
    if row.get("model_gflops_per_s") is None:
        return "- | -"
    fraction = row.get("fraction_of_matmul_rate")
    return f"{row['model_gflops_per_s']:.1f} | " + (f"{fraction:.0%}" if fraction else "-")


def _shared(rows: dict[tuple[str, str], dict[str, Any]]) -> str:
    values = {row["share_prompt"] for (i, m), row in rows.items() if i == "ours" and m != "sft"}
    return ", ".join("n/a (no such option)" if v is None else str(v).lower() for v in values) or "-"


def render(summary: dict[str, Any], args: argparse.Namespace) -> str:
    rows = summary["_keys"]
    lines = [
        f"model={args.model} pairs={args.pairs} batch={args.batch_size} "
        f"max_length={args.max_length} threads={args.threads} repeats={args.repeats} "
        f"vocab_size={args.vocab_size or 'model'} prompt_tokens={args.prompt_tokens or 'data'} "
        f"warm-up steps excluded={args.warmup_steps} fp32, AdamW, batches in data order",
        f"ours: DPO prompt sharing (method.share_prompt) = {_shared(rows)}",
        f"float32 matmul rate measured in this run: {summary['matmul_gflops']:.1f} GFLOP/s "
        "(model GFLOP/s: 6 FLOPs per body parameter per real token and per LM-head parameter per"
        " scored token, 8 with a reference copy)"
        if summary.get("matmul_gflops")
        else "",
        "",
        "| implementation | method | reference | per s (steady) | s/step | s/step range "
        "| CPU s/step | ref. precompute s | per s incl. precompute | peak RSS MB "
        "| RSS growth MB | model GFLOP/s | of matmul rate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in args.methods:
        for impl in IMPLEMENTATIONS:
            row = rows.get((impl, method))
            if row is None:
                continue
            low, high = row["s_per_step_range"]
            lines.append(
                f"| {impl} | {method.split('-')[0].upper()} | {REFERENCE[method]} "
                f"| {row['examples_per_s']:.2f} {UNIT.get(method, 'pairs')} "
                f"| {row['s_per_step']:.3f} "
                f"| {low:.3f}–{high:.3f} | {row['cpu_s_per_step']:.3f} "
                f"| {row['precompute_seconds']:.2f} "
                f"| {row['examples_per_s_with_reference']:.2f} | {row['peak_rss_mb']:.0f} "
                f"| {row['rss_growth_mb']:.0f} | {_gflops_cells(row)} |"
            )
    lines += [
        "",
        "| comparison | time per example ours/TRL (steady) | incl. precompute "
        "| peak RSS ours/TRL |",
        "|---|---|---|---|",
    ]
    for method in args.methods:
        ours, trl = rows.get(("ours", method)), rows.get(("trl", method))
        if ours and trl:
            with_ref = "examples_per_s_with_reference"
            lines.append(
                f"| {method} | {ours['s_per_step'] / trl['s_per_step']:.2f} "
                f"| {trl[with_ref] / ours[with_ref]:.2f} "
                f"| {ours['peak_rss_mb'] / trl['peak_rss_mb']:.2f} |"
            )
    if "sft" in args.methods:
        lines += [
            "",
            "| implementation | DPO/SFT time per example: precomputed ref. (steady) "
            "| precomputed, incl. precompute | model-copy ref. |",
            "|---|---|---|---|",
        ]
        for impl in IMPLEMENTATIONS:
            sft = rows.get((impl, "sft"))
            if not sft:
                continue
            cells = []
            for method, key in (
                ("dpo-precompute", "examples_per_s"),
                ("dpo-precompute", "examples_per_s_with_reference"),
                ("dpo-copy", "examples_per_s"),
            ):
                dpo = rows.get((impl, method))
                cells.append(f"{sft['examples_per_s'] / dpo[key]:.2f}" if dpo else "-")
            lines.append(f"| {impl} | {' | '.join(cells)} |")
    ours_sft = rows.get(("ours", "sft"))
    others = [m for m in args.methods if m != "sft" and rows.get(("ours", m))]
    if ours_sft and others:
        lines += [
            "",
            "clintune's methods, time per example relative to its SFT (an example: a pair, "
            "or for KTO one desirable/undesirable example, two per pair):",
            "",
            "| method | reference | time per example / SFT's (steady) | incl. precompute "
            "| trained tokens per example / SFT's |",
            "|---|---|---|---|---|",
        ]
        sft_tokens = ours_sft["tokens"] / ours_sft["examples"]
        for method in others:
            row = rows[("ours", method)]
            steady = ours_sft["examples_per_s"] / row["examples_per_s"]
            with_ref = ours_sft["examples_per_s"] / row["examples_per_s_with_reference"]
            # Real (non-padding) tokens through the policy's forward and backward per example.
            tokens = row["tokens"] / row["examples"] / sft_tokens
            lines.append(
                f"| {method} | {REFERENCE[method]} | {steady:.2f} | {with_ref:.2f} | {tokens:.2f} |"
            )
    lines += ["", "Sequences (TRL's tokenisation of the pre-templated text vs clintune's ids):"]
    for method in args.methods:
        ours, trl = rows.get(("ours", method)), rows.get(("trl", method))
        if ours and trl:
            lines.append(
                f"- {method}: identical {trl['identical_sequences']}/{trl['compared_sequences']};"
                f" real tokens per epoch ours {ours['tokens']}, TRL {trl['tokens']};"
                f" padded tokens ours {ours['padded_tokens']}, TRL {trl['padded_tokens']};"
                f" steps {ours['steps']} (timed {ours['timed_steps']});"
                f" mean train loss ours {ours['mean_train_loss']:.4f},"
                f" TRL {trl['mean_train_loss']:.4f}"
                f" (lr {ours['learning_rate']:g})"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=64, help="preference pairs (= SFT examples)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs (SFT: examples) per step")
    parser.add_argument(
        "--ref-batch-size", type=int, default=16, help="pairs per reference precompute batch"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds; medians")
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps left out of timing")
    parser.add_argument(
        "--share-prompt",
        choices=("config", "true", "false"),
        default="config",
        help="our DPO's prompt sharing (method.share_prompt), where the project has it",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=0,
        help="rows of the embedding and LM head (e.g. 128256, Llama 3's); 0: the model's own",
    )
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=0,
        help="lengthen prompts with earlier notes to about this many tokens (e.g. 1024)",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--model", default="tiny_llama", help="a conf/model/ config (tiny_*)")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)}",
    )
    parser.add_argument(
        "--cache-dir",
        default=os.environ.get("CLINTUNE_CACHE", str(Path.home() / ".cache" / "clintune")),
        help="where the tiny model is built (as train.py's paths.cache_dir)",
    )
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.worker:
        args.methods = [m.strip() for m in str(args.methods).split(",") if m.strip()]
        unknown = set(args.methods) - set(METHODS)
        if unknown:
            parser.error(f"unknown --methods {sorted(unknown)}; choose from {METHODS}")
        if args.pairs // args.batch_size <= args.warmup_steps:
            parser.error("--pairs / --batch-size must exceed --warmup-steps")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    # Build the tiny model once up front so that no worker pays (or times) the build.
    from clintune.models.loading import resolve_source

    resolve_source(_compose(args.model, args.cache_dir).model, args.cache_dir)
    results = []
    started = time.perf_counter()
    print("[     0s] measuring the matmul rate", file=sys.stderr)
    matmul_gflops = _run_worker(args, "matmul")["matmul_gflops"]
    for repeat in range(args.repeats):
        # Alternate which implementation goes first, so neither always runs on a warmer machine.
        order = IMPLEMENTATIONS if repeat % 2 == 0 else IMPLEMENTATIONS[::-1]
        for method in args.methods:
            for impl in order:
                if impl == "trl" and method in OURS_ONLY:
                    continue  # no TRL peer is timed for these
                name = f"{impl}:{method}"
                print(f"[{time.perf_counter() - started:6.0f}s] running {name}", file=sys.stderr)
                result = _run_worker(args, name)
                result["repeat"] = repeat
                results.append(result)
    summary = summarise(results, args, matmul_gflops)
    print(render(summary, args))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "result_file")},
            "summary": summary["rows"],
            "matmul_gflops": matmul_gflops,
            "runs": results,
        }
        out.write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
