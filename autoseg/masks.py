"""Bounding boxes, connected components and overlap of masks and label maps, shared by every stage that inspects a
segmentation (training validation, postprocessing, evaluation, the report)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of a boolean mask (one C pass via ``find_objects``), None when empty."""
    found = ndimage.find_objects(mask.view(np.uint8), max_label=1)
    return found[0] if found else None


def join_boxes(
    boxes: Sequence[tuple[slice, ...] | None], shape: tuple[int, ...], margin: int
) -> tuple[slice, ...] | None:
    """The smallest box holding every given box (None entries skipped), grown by ``margin`` and clipped to
    ``shape``; None when there is no box."""
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    return tuple(
        slice(max(min(b[ax].start for b in boxes) - margin, 0), min(max(b[ax].stop for b in boxes) + margin, n))
        for ax, n in enumerate(shape)
    )


def label_boxes(arr: np.ndarray, max_label: int) -> list[tuple[slice, ...] | None]:
    """Bounding box of each label value 1..max_label (index value - 1), None for a value not present."""
    boxes = ndimage.find_objects(arr, max_label=max_label) if max_label > 0 else []
    return list(boxes) + [None] * (max_label - len(boxes))


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Labelled components of a boolean mask and their count, with full connectivity (26 in 3D): lesions that
    touch diagonally are one lesion, everywhere in autoseg (evaluation, postprocessing, report)."""
    return ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))


def dice_per_label(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int]) -> dict[str, float]:
    """Dice per label value of two label maps; 1.0 when both lack the label, 0.0 when exactly one has it.

    The cheap score used during training validation and model selection; the evaluation computes the rest.

    >>> dice_per_label(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), [1, 2, 3])
    {'1': 0.6666666666666666, '2': 0.6666666666666666, '3': 1.0}
    """
    out = {}
    for v in labels:
        p, r = pred == v, ref == v
        denom = int(p.sum()) + int(r.sum())
        out[str(v)] = 1.0 if denom == 0 else 2.0 * int(np.logical_and(p, r).sum()) / denom
    return out
