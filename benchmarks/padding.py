"""Padding before and after length grouping, on the shipped data of every task.

    python benchmarks/padding.py                     # every local task, SFT batches of 16
    python benchmarks/padding.py --tasks triage --batch-size 8 --world-size 2

For each task it encodes the training split with the default model's tokenizer exactly as the
SFT stage does, takes the first epoch's batches as the training sampler deals them (shuffled;
then grouped by length as `method.train.group_by_length=true` does) and prints the share of
the tokens in those batches that are padding. No model runs, so it takes seconds."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("PROJECT_ROOT", str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from clintune.batching import padded_length, padding_fraction  # noqa: E402
from clintune.checkpointing import EpochSampler  # noqa: E402
from clintune.models.loading import load_tokenizer, resolve_source  # noqa: E402
from clintune.stages.common import encode_split  # noqa: E402

LOCAL_TASKS = ("classification", "reasoning", "summarization", "triage")


def _rank_order(sampler: EpochSampler, world_size: int) -> list[list[int]]:
    orders = []
    for rank in range(world_size):
        sampler.rank = rank
        orders.append(list(iter(sampler)))
    return orders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(LOCAL_TASKS))
    parser.add_argument("--model", default="tiny_llama")
    parser.add_argument("--batch-size", type=int, default=None, help="per process (sft.yaml's)")
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"{'task':<16}{'examples':>9}{'batch':>7}{'shuffled':>10}{'grouped':>9}")
    for task_name in args.tasks:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("train", [f"task={task_name}", f"model={args.model}", "method=sft"])
        with open_dict(cfg):
            cfg.paths.root = str(REPO)
        task = instantiate(cfg.task, _convert_="partial")
        tokenizer = load_tokenizer(resolve_source(cfg.model, cfg.paths.cache_dir))
        encoded, _ = encode_split(task, tokenizer, task.load_split("train"), cfg.model.max_length)
        lengths = [padded_length(e) for e in encoded]
        batch = args.batch_size or cfg.method.train.batch_size
        fractions = []
        for grouped in (False, True):
            sampler = EpochSampler(
                encoded,
                shuffle=True,
                seed=args.seed,
                num_replicas=args.world_size,
                rank=0,
                lengths=lengths if grouped else None,
                batch_size=batch,
                bucket_batches=cfg.method.train.length_bucket_batches,
            )
            padded = real = 0.0
            for order in _rank_order(sampler, args.world_size):
                share = padding_fraction(lengths, order, batch)
                total = sum(lengths[i] for i in order) / (1 - share)
                padded += total
                real += total * (1 - share)
            fractions.append((padded - real) / padded)
        print(
            f"{task_name:<16}{len(encoded):>9}{batch:>7}{fractions[0]:>10.1%}{fractions[1]:>9.1%}"
        )


if __name__ == "__main__":
    main()
