"""A/B: one training step of clintune's DPO at an earlier revision against the working tree,
interleaved, for changes smaller than the run-to-run noise of a shared CPU.

``dpo_vs_trl.py`` runs every configuration in its own process, one after the other; on a
shared 2-core machine the same command moves by 10–15% between runs, which hides a change of a
few per cent. Here two long-lived worker processes, one importing ``src/`` of the earlier
revision (``git archive``) and one the working tree's, take turns: round after round each
times forward + backward of the same batches on the same weights (no optimiser step, so every
round does the same work), so slow spells of the machine fall on both sides alike. The parent
prints the median seconds per step of each side, their ratio, and a Wilcoxon signed-rank test
(scipy) over the paired rounds.

    python benchmarks/step_ab.py --before da29c45 [--reference copy|precompute]
                                 [--rounds 10] [--pairs 64] [--threads 2]

Both sides must give the same log-probs on the first batch (checked), so they time the same
math.
This is a benchmark, not a test: it asserts nothing about speed. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent


def compare_rounds(before: list[float], after: list[float]) -> dict[str, float]:
    """Median step time of each side, after ÷ before, and the two-sided Wilcoxon signed-rank
    P value over paired rounds (round i of one side ran next to round i of the other)."""
    from scipy.stats import wilcoxon

    if len(before) != len(after) or len(before) < 2:
        raise ValueError("need the same number (at least 2) of rounds on each side")
    median_before, median_after = statistics.median(before), statistics.median(after)
    differences = [a - b for a, b in zip(after, before, strict=True)]
    p_value = 1.0 if not any(differences) else float(wilcoxon(after, before).pvalue)
    return {
        "before_s_per_step": median_before,
        "after_s_per_step": median_after,
        "after_over_before": median_after / median_before,
        "wilcoxon_p": p_value,
    }


# ----------------------------------------------------------------------------- worker


def worker(args: argparse.Namespace) -> None:
    """Loads the saved model and batches, builds this tree's DPOModule, then for every line on
    stdin times one round (all batches, forward + backward) and prints it as JSON."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from clintune.methods.dpo import DPOModule

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    workdir = Path(args.workdir)
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    batches = torch.load(workdir / "batches.pt")
    reference_model = copy.deepcopy(model) if args.reference == "copy" else None
    module = DPOModule(
        model.train(),
        learning_rate=1e-4,
        reference=args.reference,
        reference_model=reference_model,
    )

    def one_round() -> tuple[float, float]:
        started = time.perf_counter()
        fingerprint = float("nan")
        for index, batch in enumerate(batches):
            out = module.pair_losses(batch)
            out["losses"].mean().backward()
            module.model.zero_grad(set_to_none=True)
            if index == 0:
                # The policy's log-probs, not the loss: with a fresh reference copy the loss
                # is log 2 whatever the log-probs are.
                fingerprint = float(out["logps/chosen"].sum())
        return time.perf_counter() - started, fingerprint

    for line in sys.stdin:
        if not line.strip():
            continue
        seconds, fingerprint = one_round()
        print(json.dumps({"seconds": seconds, "chosen_logps": fingerprint}), flush=True)


# ----------------------------------------------------------------------------- parent


def _export_source(revision: str, into: Path) -> Path:
    """``src/`` of ``revision`` (a commit, tag or branch of this repository) under ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    archive = into / "src.tar"
    with archive.open("wb") as handle:
        subprocess.run(["git", "archive", revision, "src"], cwd=REPO, stdout=handle, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def _prepare(args: argparse.Namespace, workdir: Path) -> None:
    """The tiny model and the shared-prompt batches, made once by today's code, so that both
    sides read the same weights and the same tensors."""
    import torch

    sys.path.insert(0, str(BENCHMARKS))
    import dpo_vs_trl

    from clintune import stages

    setup = dpo_vs_trl._setup(
        argparse.Namespace(
            seed=args.seed,
            model=args.model,
            cache_dir=args.cache_dir,
            pairs=args.pairs,
            vocab_size=0,
            prompt_tokens=0,
        )
    )
    setup["model"].save_pretrained(workdir / "model")
    encoded = dpo_vs_trl._our_encodings(setup, args.max_length, False)
    collate = stages.pair_collate(True)
    pad_id = setup["tokenizer"].pad_token_id
    batches = []
    for start in range(0, len(encoded), args.batch_size):
        batch = collate(encoded[start : start + args.batch_size], pad_id)
        if args.reference == "precompute":
            rows = batch["prompt_ids"].size(0)
            # The values do not change the step's work; the losses only need to be finite.
            batch["ref_chosen_logps"] = torch.zeros(rows)
            batch["ref_rejected_logps"] = torch.zeros(rows)
        batches.append(batch)
    torch.save(batches, workdir / "batches.pt")


def _start_worker(args: argparse.Namespace, source: Path, workdir: Path) -> subprocess.Popen:
    sys.path.insert(0, str(BENCHMARKS))
    from dpo_vs_trl import worker_env

    env = {**worker_env(args.threads), "PYTHONPATH": str(source)}
    command = [
        sys.executable,
        __file__,
        "--worker",
        f"--workdir={workdir}",
        f"--threads={args.threads}",
        f"--reference={args.reference}",
    ]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def _round(proc: subprocess.Popen) -> dict[str, float]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"a worker exited with {proc.wait()} (its stderr is above)")
    return json.loads(line)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="clintune-step-ab-") as tmp:
        workdir = Path(tmp)
        before_src = _export_source(args.before, workdir / "before")
        _prepare(args, workdir)
        sides = {
            "before": _start_worker(args, before_src, workdir),
            "after": _start_worker(args, REPO / "src", workdir),
        }
        try:
            warm = {name: _round(proc) for name, proc in sides.items()}
            logps = {name: result["chosen_logps"] for name, result in warm.items()}
            if abs(logps["before"] - logps["after"]) > 1e-4 * max(1.0, abs(logps["after"])):
                raise SystemExit(f"the two sides compute different log-probs: {logps}")
            seconds: dict[str, list[float]] = {name: [] for name in sides}
            steps = -(-args.pairs // args.batch_size)
            for index in range(args.rounds):
                # Alternate which side goes first, so neither always follows the other.
                order = list(sides) if index % 2 == 0 else list(reversed(sides))
                for name in order:
                    seconds[name].append(_round(sides[name])["seconds"] / steps)
        finally:
            for proc in sides.values():
                if proc.stdin is not None:
                    proc.stdin.close()
                proc.wait()
    result = compare_rounds(seconds["before"], seconds["after"])
    print(
        f"DPO step, reference={args.reference}, {args.pairs} pairs, batch {args.batch_size}, "
        f"{args.threads} threads, {args.rounds} interleaved rounds (+1 warm-up), "
        f"first batch's summed chosen log-probs {logps['after']:.4f} on both sides"
    )
    print("| | s/step (median) | s/step range |")
    print("|---|---|---|")
    for name, label in (("before", args.before), ("after", "working tree")):
        values = seconds[name]
        print(
            f"| {label} | {statistics.median(values):.4f} | {min(values):.4f}–{max(values):.4f} |"
        )
    print(
        f"\nworking tree ÷ {args.before}: {result['after_over_before']:.3f} "
        f"(Wilcoxon signed-rank over paired rounds, P = {result['wilcoxon_p']:.3g})"
    )
    if args.out:
        Path(args.out).write_text(json.dumps({**result, "seconds": seconds}, indent=2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="HEAD", help="the revision to compare against")
    parser.add_argument("--reference", choices=("copy", "precompute"), default="copy")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per side")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--model", default="tiny_llama")
    parser.add_argument(
        "--cache-dir",
        default=os.environ.get("CLINTUNE_CACHE", str(Path.home() / ".cache" / "clintune")),
    )
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2")
    return args


if __name__ == "__main__":
    main()
