"""What every subcommand shares: the roots from the environment and the argument types and flags used twice."""

from __future__ import annotations

import argparse
import math
import os

from ..layout import Roots

CONFIGURATIONS = ["2d", "3d_fullres", "3d_lowres", "3d_cascade"]


def env_roots() -> Roots:
    """The raw, preprocessed and results folders from ``AUTOSEG_RAW``/``AUTOSEG_PREPROCESSED``/``AUTOSEG_RESULTS``
    (defaults under the working directory): the only place the process environment is read."""
    return Roots.from_env(os.environ)


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {v}")
    return v


def tolerance(text: str) -> float:
    """argparse type: a finite distance >= 0 in mm."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a distance in mm, got {text!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"tolerance must be finite and >= 0 mm, got {v}")
    return v


def add_label_flags(p: argparse.ArgumentParser, fallback: str = "the input folder") -> None:
    """``-d DATASET | --labels JSON``, shared by ``evaluate`` and ``report``."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("-d", "--dataset", default=None,
                   help="dataset id (501) or name (Dataset501_Name) whose AUTOSEG_RAW dataset.json defines the labels "
                   "and file ending")
    g.add_argument("--labels", default=None, metavar="JSON",
                   help="a dataset.json (or any JSON with a 'labels' object) defining the labels; without -d or "
                   f"--labels, a dataset.json in {fallback} is used")


def add_device_flags(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--gpu-memory-gb`` of the planner."""
    p.add_argument("--device", choices=["auto", "gpu", "cpu"], default="auto",
                   help="what training will run on: gpu fits patch and batch to --gpu-memory-gb; cpu sizes the "
                   "network for compute (8 base features, ~64^3 patch); auto picks gpu if CUDA is available")
    p.add_argument("--gpu-memory-gb", type=float, default=8.0,
                   help="training memory budget the patch and batch size are fitted to (default 8)")
