"""``autoseg demo``: the whole pipeline on a synthetic dataset."""

from __future__ import annotations

import argparse
from typing import Any

from ..demo import run_demo
from .common import bounded_int, positive_float


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``autoseg demo``."""
    p = subparsers.add_parser(
        "demo", help="run the whole pipeline on a synthetic abdominal CT dataset",
        description="Generate a phantom dataset, plan, preprocess, train 3d_fullres on all training cases within "
        "a time budget, predict the test cases, evaluate and write the report, all under --output. A rerun "
        "reuses finished steps.",
    )
    p.add_argument("-o", "--output", default="autoseg_demo", help="demo folder (default ./autoseg_demo)")
    p.add_argument("--train-cases", type=bounded_int(1, 10_000, "24"), default=24, help="phantom training cases (default 24)")
    p.add_argument("--test-cases", type=bounded_int(1, 10_000, "8"), default=8, help="phantom test cases (default 8)")
    p.add_argument("--time-budget", type=positive_float("11"), default=11.0,
                   help="training minutes; the schedule is scaled to it (default 11: with the 1.5-minute install, "
                   "the whole `make demo` stays under 15 minutes on 2 cores)")
    p.add_argument("--epochs", type=bounded_int(1, example="1000"), default=1000, help="epoch cap (the time budget usually ends training)")
    p.add_argument("--iters-per-epoch", type=bounded_int(1, example="25"), default=25, help="iterations per epoch (default 25)")
    p.add_argument("--val-iters", type=bounded_int(1, example="4"), default=4, help="validation batches per epoch (default 4)")
    p.add_argument("--seed", type=bounded_int(0, 2**32 - 1, "0"), default=0, help="seed for the phantom, weights and sampling (default 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to train and predict")
    p.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (8x the prediction time)")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Run ``autoseg demo``; returns the exit status (0 also when a quality target was missed: it is reported)."""
    run_demo(args.output, args.train_cases, args.test_cases, args.time_budget, args.epochs, args.iters_per_epoch,
             args.val_iters, args.seed, args.device, args.tta)
    return 0
