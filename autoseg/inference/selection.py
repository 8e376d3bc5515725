"""Choosing what to predict with from cross-validation (``autoseg find_best_configuration``): the best
configuration or pairwise ensemble by mean foreground Dice on the validation cases, its postprocessing, and the
thresholds of ``predict --uncertainty``'s review flag fitted on the same cases (:func:`calibrate_review`).

The validation probabilities come from one fold per case (mirrored only on a GPU), while ``predict`` averages every
fold and mirroring, whose averaged probabilities are softer where folds disagree: the thresholds are fitted on a
smaller ensemble than the one they are applied to (``benchmarks/RESULTS.md`` measures them on held-out cases)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AutosegError
from ..io.images import read_image
from ..jsonfile import read_json
from ..labels import LabelSpec, labels_from_probabilities
from ..layout import SUMMARY_JSON, VALIDATION, checkpoint_file
from ..masks import dice_per_label
from .ensemble import average_probabilities
from .postprocess import apply_postprocessing, determine_postprocessing, mean_dice
from .uncertainty import DICE_BELOW, calibrate_review, expected_dice


def _unfinished_folds(config_dir: Path) -> list[str]:
    """Folds with a validation summary but no final checkpoint: a run that stopped (or is running) after an
    earlier validation; their predictions come from weights no one can predict with, so they are not scored."""
    return [s.parent.parent.name for s in sorted(config_dir.glob(f"fold_*/{VALIDATION}/{SUMMARY_JSON}"))
            if not checkpoint_file(s.parent.parent, "final").is_file()]


def _cv_cases(config_dir: Path) -> dict[str, tuple[Path, str]]:
    """Validation predictions of every fold trained to the end (``checkpoint_final`` present): case id ->
    (folder, fold)."""
    out = {}
    for summary in sorted(config_dir.glob(f"fold_*/{VALIDATION}/{SUMMARY_JSON}")):
        if not checkpoint_file(summary.parent.parent, "final").is_file():
            continue
        fix = "fix it, or delete that fold's validation/ folder and train the fold again"
        for case in read_json(summary, fix, "validation_summary")["dice_per_case"]:
            out[case] = (summary.parent, summary.parent.parent.name.removeprefix("fold_"))
    return out


def find_best_configuration(results: Path, raw_labels: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Score every trained configuration and pairwise ensemble on the cases all of them validated, choose the best
    by mean foreground Dice, determine postprocessing on it, and return the inference plan."""
    spec = LabelSpec.from_meta(meta)
    _, _, rco = spec.layout()
    ending = meta["file_ending"]
    labels = spec.predicted_values()
    spec_names = spec.names
    trained = {d.name: _cv_cases(d) for d in sorted(results.iterdir()) if d.is_dir() and _cv_cases(d)}
    unfinished = [f"{d.name}/{fold}" for d in sorted(results.iterdir()) if d.is_dir() for fold in _unfinished_folds(d)]
    if not trained:
        raise AutosegError(f"{results}: no configuration has validation results of a fold trained to the end"
                           f"{' (without checkpoint_final: ' + ', '.join(unfinished) + ')' if unfinished else ''}; "
                           "train folds to the end first")
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
    plan = {
        "configurations": configs,
        "folds": {c: sorted({trained[c][k][1] for k in trained[c]}) for c in configs},
        "postprocessing": spec,
        "mean_foreground_dice": table,
        "cases": len(cases),
        "notes": [f"chose {best} (mean foreground Dice {table[best]:.4f} on {len(cases)} validation cases)"] + notes
        + [f"ignored {f}: its validation has no checkpoint_final beside it (training did not finish)"
           for f in unfinished],
    }
    final = [apply_postprocessing(seg, spec) for seg in candidates[best]]
    estimates, source = _cv_expected_dice([trained[c] for c in configs], cases, final, labels, rco)
    if estimates is None:
        plan["notes"].append(f"review flag not calibrated: {source}")
        return plan
    dice = [dice_per_label(seg, ref, labels) for seg, ref in zip(final, refs)]
    names = {str(v): spec_names.get(v, str(v)) for v in labels}
    plan["review"] = calibrate_review(estimates, dice, names)
    for key, rule in plan["review"]["structures"].items():
        sens, spec_ = rule["cv_sensitivity"], rule["cv_specificity"]
        plan["notes"].append(
            f"review: flag when {rule['name']} expected Dice < {rule['expected_dice_below']:.4g} ({source}; "
            f"{rule['low_dice_cases']} of {len(cases)} validation cases below Dice {DICE_BELOW}, in-sample "
            f"sensitivity {'-' if sens is None else f'{sens:.2f}'}, specificity "
            f"{'-' if spec_ is None else f'{spec_:.2f}'})")
    return plan


def _cv_expected_dice(folders: list[dict[str, tuple[Path, str]]], cases: list[str], segs: list[np.ndarray],
                      labels: list[int], rco: list[int] | None) -> tuple[list[dict[str, float]] | None, str]:
    """Expected Dice per validation case of the chosen candidate (one configuration's or an ensemble's folds):
    from the saved probabilities (``train --npz``: exactly what ``predict`` computes, after postprocessing), else
    from the validation summaries (before postprocessing); ``(None, why)`` when neither is there."""
    npz = [[f[c][0] / f"{c}.npz" for f in folders] for c in cases]
    if all(p.is_file() for paths in npz for p in paths):
        return [expected_dice(average_probabilities(paths)[0], seg, labels, rco)
                for paths, seg in zip(npz, segs)], "estimates from the saved validation probabilities"
    if len(folders) == 1:
        fix = "fix it, or delete that fold's validation/ folder and train the fold again"
        found: dict[str, dict[str, float]] = {}
        for summary in sorted({folders[0][c][0] / SUMMARY_JSON for c in cases}):
            found.update(read_json(summary, fix, "validation_summary").get("expected_dice_per_case", {}))
        if all(c in found for c in cases):
            return [found[c] for c in cases], "estimates from the validation summaries, before postprocessing"
    return None, ("the validation cases have neither saved probabilities (train --npz) nor expected Dice in their "
                  "summary.json (written by this autoseg's validation); validate the folds again to calibrate it")

