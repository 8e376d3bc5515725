"""``autoseg phantom``: write a synthetic dataset so every other command has data to run on."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..phantom import DEFAULT_NAME, SIZES, write_dataset
from .common import bounded_int, folder_name


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``autoseg phantom``: write a synthetic dataset so every other command has data to run on."""
    p = subparsers.add_parser(
        "phantom",
        help="write a synthetic abdominal CT dataset (nnU-Net v2 raw layout)",
        description="Write a deterministic synthetic abdominal CT dataset with liver, kidney and tumour labels.",
    )
    p.add_argument("-o", "--output", required=True, type=Path, metavar="DIR",
                   help="folder to write into; the dataset goes to DIR/<name>/")
    p.add_argument("--cases", type=bounded_int(1, 10_000, "8"), default=8, metavar="N", help="number of training cases (default 8)")
    p.add_argument("--test-cases", type=bounded_int(0, 10_000, "2"), default=0, metavar="N",
                   help="number of test cases, written with labels to imagesTs/ and labelsTs/ (default 0)")
    p.add_argument("--seed", type=bounded_int(0, 2**32 - 1, "0"), default=0, metavar="S",
                   help="dataset seed; the same seed writes the same files (default 0)")
    p.add_argument("--size", choices=sorted(SIZES), default="small",
                   help="small: ~60x60x32 voxels, for tests; demo: ~128x128x64, for the demo (default small)")
    p.add_argument("--name", type=folder_name, default=DEFAULT_NAME, metavar="NAME",
                   help=f"dataset folder name (default {DEFAULT_NAME})")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Run ``autoseg phantom``; returns the exit status."""
    folder = write_dataset(args.output, args.cases, args.seed, args.size, args.test_cases, args.name)
    tail = f" and {args.test_cases} test" if args.test_cases else ""
    print(f"wrote {args.cases} training{tail} case(s) ({args.size}) to {folder}")
    return 0
