"""The ``autoseg`` command: every argparse parser, and the only reader of ``sys.argv`` and the environment."""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Sequence

from ..version import __version__
from ..errors import AutosegError
from . import bundle, convert, demo, evaluation, nnunet, phantom, stages


EXIT_OK, EXIT_INPUT, EXIT_USAGE, EXIT_BUG = 0, 1, 2, 3  # documented in the README ("Exit codes")
DEBUG_HELP = "on an internal error (exit 3) print the full traceback"


def build_parser() -> argparse.ArgumentParser:
    """The ``autoseg`` parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="autoseg",
        description="Self-configuring segmentation for CT (nnU-Net v2 dataset layout). Folders come from "
        "AUTOSEG_RAW, AUTOSEG_PREPROCESSED and AUTOSEG_RESULTS (defaults: ./autoseg_raw, ./autoseg_preprocessed, "
        "./autoseg_results). Exit status: 0 success, 1 bad input (with a message), 2 bad usage, 3 internal error.",
    )
    parser.add_argument("--version", action="version", version=f"autoseg {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    stages.add_cli(sub)
    evaluation.add_evaluate_cli(sub)
    evaluation.add_report_cli(sub)
    demo.add_cli(sub)
    phantom.add_cli(sub)
    bundle.add_cli(sub)
    nnunet.add_cli(sub)
    convert.add_cli(sub)
    for command in sub.choices.values():  # also after the command; SUPPRESS keeps a --debug given before it
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``autoseg`` command (``argv`` default: ``sys.argv``); returns the exit status: 0 success, 1 an input
    or environment problem (a message naming the file or flag and the fix), 2 bad usage (argparse exits with it),
    3 an internal error (a bug: one line, the traceback with ``--debug``), 130 interrupted."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AutosegError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as e:  # no permission, disk full, a file where a folder is expected, ...
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; check that the path exists, that every folder on it is a folder "
              "(not a file), that you may read and write there and that the disk has free space", file=sys.stderr)
        return EXIT_INPUT
    except MemoryError:
        print("error: out of memory; close other programs, use fewer worker processes (-np 1) or a machine with more "
              "RAM", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("interrupted; finished work is kept and a rerun continues from there", file=sys.stderr)
        return 130
    except Exception as e:  # anything else is a bug in autoseg, not a problem of the input
        if args.debug:
            traceback.print_exc()
        text = str(e).splitlines()[0][:300] if str(e) else ""
        print(f"internal error (a bug in autoseg {__version__}): {type(e).__name__}: {text}\nPlease report it with "
              "the command line, the output of `autoseg --version` and the traceback"
              f"{'' if args.debug else ' printed when you rerun with --debug'}", file=sys.stderr)
        return EXIT_BUG
