"""What every subcommand shares: the roots from the environment and the argument types and flags used twice."""

from __future__ import annotations

import argparse
import math
import os
import re
from typing import Any, Callable

from ..errors import AutosegError
from ..layout import Roots

CONFIGURATIONS = ["2d", "3d_fullres", "3d_lowres", "3d_cascade"]


CLUSTER_ADDRESS = re.compile(r"^(ray://)?[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5}$")


def cluster_flag(text: str) -> str:
    """argparse type of ``--cluster``: ``auto``, ``local`` or a Ray address (``HOST:PORT``, ``ray://HOST:PORT``)."""
    if text in ("auto", "local") or CLUSTER_ADDRESS.match(text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not auto, local or a Ray address HOST:PORT; give e.g. local or "
                                     "10.0.0.5:6379 (the address `ray start --head` prints)")


def cluster_address(flag: str | None) -> str | None:
    """What ``--cluster`` means for this run: None (no flag: no Ray), ``local``, an address, or for ``auto`` the
    address in ``RAY_ADDRESS`` when it is set, else ``auto`` (join the Ray head started on this machine, if any, else
    run without Ray; see :func:`autoseg.cluster.open_cluster`)."""
    if flag != "auto":
        return flag
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if not env:
        return "auto"
    if env != "auto" and not CLUSTER_ADDRESS.match(env):
        raise AutosegError(f"RAY_ADDRESS={env!r} (read by --cluster auto) is not a Ray address HOST:PORT or "
                           "ray://HOST:PORT; fix or unset it, or pass --cluster ADDRESS")
    print(f"--cluster auto: joining RAY_ADDRESS={env}")
    return env


def add_cluster_flag(p: argparse.ArgumentParser) -> None:
    """``--cluster``, shared by ``plan_and_preprocess`` and ``predict``."""
    p.add_argument("--cluster", type=cluster_flag, default=None, metavar="auto|local|ADDRESS",
                   help="run the cases as Ray tasks (needs autoseg[cluster]): local starts a Ray on this machine for "
                   "the run; ADDRESS (HOST:6379) joins a running cluster; auto joins RAY_ADDRESS when set, else a "
                   "Ray head started on this machine (`ray start --head`), else runs without Ray. Without the flag "
                   "no Ray is used. Same files as without it")


def env_roots() -> Roots:
    """The raw, preprocessed and results folders from ``AUTOSEG_RAW``/``AUTOSEG_PREPROCESSED``/``AUTOSEG_RESULTS``
    (defaults under the working directory): the only place the process environment is read."""
    return Roots.from_env(os.environ)


def _number(cast: Callable[[str], float], text: str, ok: Callable[[float], bool], expected: str,
            example: str) -> Any:
    """``cast(text)`` when finite and ``ok``, else an argparse error (argparse prefixes the flag) naming the value,
    what is expected and an example: the one check every numeric flag goes through."""
    try:
        value = cast(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {expected}; give e.g. {example}")
    return value


def bounded_int(low: int, high: int | None = None, example: str = "1") -> Callable[[str], int]:
    """argparse type: a whole number in [low, high] (no upper bound when ``high`` is None)."""
    expected = f"a whole number >= {low}" + (f" and <= {high}" if high is not None else "")
    return lambda text: _number(int, text, lambda v: v >= low and (high is None or v <= high), expected, example)


positive_int = bounded_int(1)
non_negative_int = bounded_int(0, example="0")


def positive_float(example: str) -> Callable[[str], float]:
    """argparse type: a finite number > 0."""
    return lambda text: _number(float, text, lambda v: v > 0, "a finite number > 0", example)


def tolerance(text: str) -> float:
    """argparse type: a finite distance >= 0 in mm."""
    return _number(float, text, lambda v: v >= 0, "a finite distance >= 0 mm", "1")


def learning_rate(text: str) -> float:
    """argparse type: an initial learning rate, finite and in (0, 10) (NaN or 0 would train nothing, silently)."""
    return _number(float, text, lambda v: 0 < v < 10, "a learning rate > 0 and < 10", "0.01 (SGD) or 0.003 (AdamW)")


def step_fraction(text: str) -> float:
    """argparse type: the sliding-window step as a fraction of the patch, in (0, 1]: 0 never advances, more than
    1 leaves voxels between tiles uncovered."""
    return _number(float, text, lambda v: 0 < v <= 1, "a fraction of the patch > 0 and <= 1", "0.5")


def folder_name(text: str) -> str:
    """argparse type: one plain folder name (it becomes a folder: no '/', no '..', no leading '.' or '-')."""
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a plain folder name; give e.g. Dataset501_Abdomen")
    return text


def fold_name(text: str) -> str:
    """argparse type: a fold id, a number or ``all`` (it becomes a folder name, fold_<id>)."""
    if not (text.isdigit() and len(text) <= 3) and text != "all":
        raise argparse.ArgumentTypeError(f"{text!r} is not a fold; give a fold number such as 0 or 'all'")
    return text


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
    p.add_argument("--gpu-memory-gb", type=positive_float("8"), default=8.0,
                   help="training memory budget the patch and batch size are fitted to (default 8)")
