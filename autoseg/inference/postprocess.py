"""Postprocessing: keep only the largest connected component, for all foreground together and per label.

``determine_postprocessing`` decides on cross-validation results which of these steps help: a step is kept only
where it raises the mean Dice of the labels it touches (nnU-Net's rule), so a liver that is always one piece can
drop stray islands while multi-focal tumours keep every lesion.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..masks import connected_components, dice_per_label


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (the mask itself when it has at most one)."""
    labelled, n = connected_components(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    return labelled == int(sizes.argmax())


def apply_postprocessing(seg: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Apply a postprocessing spec ``{"largest_component_foreground": bool, "largest_component_labels": [...]}``."""
    out = seg.copy()
    if spec.get("largest_component_foreground"):
        fg = out > 0
        out[fg & ~largest_component(fg)] = 0
    for label in spec.get("largest_component_labels", []):
        m = out == label
        out[m & ~largest_component(m)] = 0
    return out


def mean_dice(preds: Sequence[np.ndarray], refs: Sequence[np.ndarray], labels: Sequence[int]) -> float:
    """Mean over cases and labels of Dice (1 when a label is absent from both prediction and reference)."""
    scores = [d for p, r in zip(preds, refs) for d in dice_per_label(p, r, labels).values()]
    return float(np.mean(scores)) if scores else 0.0


def determine_postprocessing(
    preds: Sequence[np.ndarray], refs: Sequence[np.ndarray], labels: Sequence[int]
) -> tuple[dict[str, Any], list[str]]:
    """Choose postprocessing on paired predictions and references; returns the spec and one note per decision."""
    spec: dict[str, Any] = {"largest_component_foreground": False, "largest_component_labels": []}
    notes = []
    base = mean_dice(preds, refs, labels)
    trial = {"largest_component_foreground": True, "largest_component_labels": []}
    cand = [apply_postprocessing(p, trial) for p in preds]
    score = mean_dice(cand, refs, labels)
    keep = score > base
    notes.append(f"largest component of all foreground: mean Dice {base:.4f} -> {score:.4f}, "
                 f"{'kept' if keep else 'not kept'}")
    if keep:
        spec["largest_component_foreground"], preds, base = True, cand, score
    for label in labels:
        before = mean_dice(preds, refs, [label])
        cand = [apply_postprocessing(p, {"largest_component_labels": [label]}) for p in preds]
        after = mean_dice(cand, refs, [label])
        keep = after > before
        notes.append(f"largest component of label {label}: Dice {before:.4f} -> {after:.4f}, "
                     f"{'kept' if keep else 'not kept'}")
        if keep:
            spec["largest_component_labels"].append(int(label))
            preds = cand
    return spec, notes
