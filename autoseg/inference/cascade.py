"""Organ regions of interest for the ``3d_cascade`` configuration: where stage 2 looks, and how its result is put back.

Why: tumours live inside two organs that fill a small share of an abdominal CT, yet a plain sliding window spends
every tile on the whole volume. Stage 1 (``3d_lowres``) segments the organs cheaply on the whole image; stage 2
(the ``3d_fullres`` network, trained on patches drawn inside the organ boxes) runs at full resolution only inside
boxes around stage 1's connected foreground components, grown by a margin in millimetres, so its cost falls with
the ROI's share of the volume. Outside the boxes the result is background.

Why no stage-1 input channel (nnU-Net's cascade feeds stage 1's one-hot result to stage 2 as extra channels):
training such a stage 2 needs a stage-1 prediction of every training case made by a model that did not see it,
i.e. a full 5-fold cross-validation of stage 1 before stage 2 can start, five stage-1 trainings on a CPU budget.
Here the organ information enters through the crop instead: stage 2 is trained and run only where stage 1 (at
prediction) or the ground truth (at training) says the organs are, so it needs no stage-1 predictions of training
cases. The channel variant was not built, so it was not measured against this one.

Everything here is pure (arrays in, arrays out); :mod:`autoseg.inference.predictor` wires it to the networks and
the training sampler imports :func:`roi_boxes` to draw stage-2 patches inside ground-truth ROIs.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from ..preprocessing.resample import resample_array

Box = tuple[slice, ...]


def _overlap(a: Box, b: Box) -> bool:
    return all(x.start < y.stop and y.start < x.stop for x, y in zip(a, b))


def _union(a: Box, b: Box) -> Box:
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def merge_boxes(boxes: Sequence[Box]) -> list[Box]:
    """Replace overlapping boxes by their union until none overlap (so no voxel is predicted twice), sorted by
    their start corner."""
    out = list(boxes)
    i = 0
    while i < len(out):
        j = next((j for j in range(i + 1, len(out)) if _overlap(out[i], out[j])), None)
        if j is None:
            i += 1
        else:  # the union may now overlap a box already passed: start again
            out[i] = _union(out[i], out.pop(j))
            i = 0
    return sorted(out, key=lambda b: tuple(s.start for s in b))


def _grow(lo: int, hi: int, need: int, size: int) -> tuple[int, int]:
    """Widen [lo, hi) about its centre to at least ``min(need, size)`` voxels, shifted to stay inside [0, size)."""
    want = min(need, size)
    if hi - lo >= want:
        return lo, hi
    short = want - (hi - lo)
    lo -= (short + 1) // 2
    hi = lo + want
    shift = max(0, -lo) - max(0, hi - size)
    return lo + shift, hi + shift


def roi_boxes(mask: np.ndarray, spacing: Sequence[float], margin_mm: float, min_size: Sequence[int]) -> list[Box]:
    """Boxes (array slices) around each connected component of ``mask``, grown by ``margin_mm`` on every side
    (``ceil(margin_mm / spacing)`` voxels per axis), widened to at least ``min_size`` voxels where the image allows
    (so a stage-2 patch fits without padding), clipped to the image and merged where they overlap.
    An empty mask gives no box."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != len(spacing) or mask.ndim != len(min_size):
        raise ValueError(f"mask of {mask.ndim} dims with spacing {list(spacing)} and min_size {list(min_size)}")
    if margin_mm < 0 or any(s <= 0 for s in spacing):
        raise ValueError(f"margin_mm must be >= 0 and spacing > 0, got {margin_mm} and {list(spacing)}")
    comps, _ = ndimage.label(mask, structure=np.ones((3,) * mask.ndim))
    margin = [int(np.ceil(margin_mm / float(s) - 1e-9)) for s in spacing]
    boxes = []
    for sl in ndimage.find_objects(comps):
        box = []
        for s, m, need, size in zip(sl, margin, min_size, mask.shape):
            lo, hi = _grow(max(0, s.start - m), min(size, s.stop + m), int(need), size)
            box.append(slice(lo, hi))
        boxes.append(tuple(box))
    return merge_boxes(boxes)


def roi_fraction(boxes: Sequence[Box], shape: Sequence[int]) -> float:
    """Share of the image's voxels inside the (disjoint, as :func:`roi_boxes` returns them) boxes."""
    total = float(np.prod(shape))
    return sum(float(np.prod([s.stop - s.start for s in b])) for b in boxes) / total if total else 0.0


def map_to_grid(labels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resampling of a label map to ``shape`` covering the same extent, with the preprocessing's
    voxel-centre convention: stage 1's grid and stage 2's share the crop, only the spacing differs."""
    labels = np.asarray(labels)
    if labels.ndim != len(shape):
        raise ValueError(f"labels of {labels.ndim} dims cannot map to shape {list(shape)}")
    mapped = resample_array(labels[None].astype(np.float32), shape, [0] * labels.ndim)[0]
    return mapped.astype(labels.dtype)


def predict_in_rois(predict: Callable[[np.ndarray], np.ndarray], data: np.ndarray, boxes: Sequence[Box],
                    n_channels: int, background_channel: bool) -> np.ndarray:
    """Run ``predict`` ((C, *box) image -> (n_channels, *box) probabilities) on each box of ``data`` (C, *shape)
    and paste the results into a full-size array; outside every box the result is background (channel 0 = 1 for
    softmax outputs, all 0 for sigmoid regions). ``predict`` never sees a voxel outside the boxes."""
    out = np.zeros((n_channels,) + tuple(data.shape[1:]), dtype=np.float32)
    if background_channel:
        out[0] = 1.0
    for box in boxes:
        region = (slice(None),) + tuple(box)
        probs = np.asarray(predict(np.ascontiguousarray(data[region])))
        expected = (n_channels,) + tuple(s.stop - s.start for s in box)
        if probs.shape != expected:
            raise ValueError(f"stage-2 prediction of shape {probs.shape} for a box of shape {expected}")
        out[region] = probs
    return out


def stage2_boxes(stage1_labels: np.ndarray, shape: Sequence[int], config: dict) -> list[Box]:
    """Stage 2's ROI boxes on its preprocessed grid (``shape``) from stage 1's label map on stage 1's grid: any
    label > 0 is foreground, grown by the configuration's ``roi_margin_mm`` at its spacing, each box at least
    one stage-2 patch."""
    foreground = map_to_grid(np.asarray(stage1_labels) > 0, shape)
    return roi_boxes(foreground, config["spacing"], float(config["roi_margin_mm"]), config["patch_size"])
