"""The ``autoseg`` command: every argparse parser, and the only reader of ``sys.argv`` and the environment."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .. import __version__
from ..errors import AutosegError
from . import bundle, convert, demo, evaluation, phantom, stages


def build_parser() -> argparse.ArgumentParser:
    """The ``autoseg`` parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="autoseg",
        description="Self-configuring segmentation for CT (nnU-Net v2 dataset layout). Folders come from "
        "AUTOSEG_RAW, AUTOSEG_PREPROCESSED and AUTOSEG_RESULTS (defaults: ./autoseg_raw, ./autoseg_preprocessed, "
        "./autoseg_results).",
    )
    parser.add_argument("--version", action="version", version=f"autoseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    stages.add_cli(sub)
    evaluation.add_evaluate_cli(sub)
    evaluation.add_report_cli(sub)
    demo.add_cli(sub)
    phantom.add_cli(sub)
    bundle.add_cli(sub)
    convert.add_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``autoseg`` command (``argv`` default: ``sys.argv``); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AutosegError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # no permission, disk full, a file where a folder is expected, ...
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; check that the path exists, that every folder on it is a folder "
              "(not a file), that you may read and write there and that the disk has free space", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; finished work is kept and a rerun continues from there", file=sys.stderr)
        return 130

