"""python -m clintune.report [PATHS...] [--wandb ENTITY/PROJECT[:GROUP]] [--out DIR] ..."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clintune.report.collect import Collection, collect_dirs, collect_wandb
from clintune.report.render import comparison_markdown, headline_markdown, write_report
from clintune.report.table import build_report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m clintune.report",
        description="Turn a sweep's runs into the comparison table, significance tests, "
        "compute table and plots.",
    )
    parser.add_argument("paths", nargs="*", help="multirun directories and/or run directories")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT[:GROUP]", help="read runs from W&B")
    parser.add_argument("--out", type=Path, help="output directory (default: <first path>/report)")
    parser.add_argument("--correction", choices=("holm", "none"), default="holm")
    parser.add_argument(
        "--resamples", type=int, default=10000, help="permutation-test resamples (default 10000)"
    )
    parser.add_argument("--methods", help="comma-separated methods to report, e.g. base,sft,dpo")
    parser.add_argument(
        "--headline",
        action="store_true",
        help="print the headline table (one row per task and model) instead of the full one",
    )
    parser.add_argument(
        "--log-to-wandb", action="store_true", help="also log the tables to W&B (online only)"
    )
    args = parser.parse_args(argv)
    if not args.paths and not args.wandb:
        parser.error("give run/multirun directories, --wandb ENTITY/PROJECT[:GROUP], or both")
    if args.resamples < 1:
        parser.error("--resamples must be at least 1")
    return args


def main(argv: Sequence[str] | None = None, *, wandb_api: Any | None = None) -> int:
    args = parse_args(argv)
    collection = collect_dirs(args.paths) if args.paths else Collection(runs=[])
    if args.wandb:
        try:
            online = collect_wandb(args.wandb, api=wandb_api)
        except Exception as error:  # no network, no API key, bad path: say so plainly
            print(f"error: could not read W&B runs from {args.wandb}: {error}", file=sys.stderr)
            return 2
        collection.runs += online.runs
        collection.warnings += online.warnings
    if not collection.runs:
        for warning in collection.warnings:
            print(f"error: {warning}", file=sys.stderr)
        return 1
    methods = [m for m in args.methods.split(",") if m] if args.methods else None
    report = build_report(
        collection, methods=methods, correction=args.correction, n_resamples=args.resamples
    )
    out = args.out or (Path(args.paths[0]) / "report" if args.paths else Path("report"))
    statuses = Counter(r.status for r in collection.runs)
    written = write_report(report, out, dict(sorted(statuses.items())))
    print(headline_markdown(report) if args.headline else comparison_markdown(report))
    print(flush=True)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"Report in {out}: {', '.join(sorted(written))}")
    if args.log_to_wandb:
        from clintune.report.wandb_log import log_report

        for line in log_report(report, collection.runs, args.wandb):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
