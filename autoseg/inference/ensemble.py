"""Averaging saved probabilities of several models (``autoseg ensemble``) and choosing the best configuration
from cross-validation results (``autoseg find_best_configuration``)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..io.images import Geometry, read_image, read_probabilities, write_image, write_probabilities
from ..errors import AutosegError
from .postprocess import determine_postprocessing, mean_dice
from .predictor import labels_from_probabilities


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


def _cv_cases(config_dir: Path) -> dict[str, tuple[Path, str]]:
    """Validation predictions of every trained fold: case id -> (folder, fold)."""
    out = {}
    for summary in sorted(config_dir.glob("fold_*/validation/summary.json")):
        for case in json.loads(summary.read_text())["dice_per_case"]:
            out[case] = (summary.parent, summary.parent.parent.name.removeprefix("fold_"))
    return out


def find_best_configuration(results: Path, raw_labels: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Score every trained configuration and pairwise ensemble on the cases all of them validated, choose the best
    by mean foreground Dice, determine postprocessing on it, and return the inference plan."""
    from ..training.trainer import label_layout, predicted_labels

    _, _, rco = label_layout(meta)
    ending = meta["file_ending"]
    labels = predicted_labels(meta)
    trained = {d.name: _cv_cases(d) for d in sorted(results.iterdir()) if d.is_dir() and _cv_cases(d)}
    if not trained:
        raise AutosegError(f"{results}: no configuration has validation results; train folds to the end first")
    cases = sorted(set.intersection(*(set(v) for v in trained.values())))
    if not cases:
        raise AutosegError(f"{results}: the trained configurations share no validation case; train the same folds")
    refs = [read_image(raw_labels / f"{c}{ending}")[0] for c in cases]
    candidates: dict[str, list[np.ndarray]] = {
        name: [read_image(v[c][0] / f"{c}{ending}")[0] for c in cases] for name, v in trained.items()
    }
    for a, b in itertools.combinations(sorted(trained), 2):
        if all((trained[n][c][0] / f"{c}.npz").is_file() for n in (a, b) for c in cases):
            candidates[f"{a}+{b}"] = [
                labels_from_probabilities(average_probabilities(
                    [trained[a][c][0] / f"{c}.npz", trained[b][c][0] / f"{c}.npz"])[0], rco) for c in cases
            ]
    table = {name: mean_dice(preds, refs, labels) for name, preds in candidates.items()}
    best = max(table, key=lambda k: (table[k], -k.count("+")))
    spec, notes = determine_postprocessing(candidates[best], refs, labels)
    configs = best.split("+")
    return {
        "configurations": configs,
        "folds": {c: sorted({trained[c][k][1] for k in trained[c]}) for c in configs},
        "postprocessing": spec,
        "mean_foreground_dice": table,
        "cases": len(cases),
        "notes": [f"chose {best} (mean foreground Dice {table[best]:.4f} on {len(cases)} validation cases)"] + notes,
    }

