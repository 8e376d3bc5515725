"""Averaging saved probabilities of several models (``autoseg ensemble``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io.images import Geometry, read_probabilities, write_image, write_probabilities
from ..errors import AutosegError
from ..labels import labels_from_probabilities


def average_probabilities(paths: list[Path]) -> tuple[np.ndarray, Geometry]:
    """Mean of several models' probabilities for one case; shapes and geometry must agree."""
    total, geo = read_probabilities(paths[0])
    for p in paths[1:]:
        probs, g = read_probabilities(p)
        if probs.shape != total.shape or not np.allclose(g.spacing, geo.spacing) or not np.allclose(g.origin, geo.origin):
            raise AutosegError(f"{p}: shape {probs.shape} or geometry differs from {paths[0]} {total.shape}; "
                               "ensemble only predictions of the same images")
        total += probs
    return total / len(paths), geo


def ensemble_folders(in_dirs: list[Path], out_dir: Path, file_ending: str, regions_class_order: list[int] | None,
                     save_probabilities: bool = False) -> int:
    """Average the probabilities of the cases every folder has, write labels (and probabilities); returns count."""
    common = set.intersection(*({p.stem for p in d.glob("*.npz")} for d in in_dirs))
    if not common:
        raise AutosegError(f"no case has probabilities (.npz, from --save-probabilities) in all of {in_dirs}")
    for case in sorted(common):
        probs, geo = average_probabilities([d / f"{case}.npz" for d in in_dirs])
        write_image(out_dir / f"{case}{file_ending}", labels_from_probabilities(probs, regions_class_order), geo)
        if save_probabilities:
            write_probabilities(out_dir / f"{case}.npz", probs, geo)
    return len(common)
