"""Overlap, surface-distance and volume metrics of one binary prediction against its reference.

Metric conventions (chosen once here, used everywhere, covered by the tests)
----------------------------------------------------------------------------
Overlap. ``dice = 2TP / (|P| + |R|)``, ``iou = TP / |P u R|``, ``sensitivity = TP / |R|``,
``precision = TP / |P|`` (voxel counts). When *both* masks are empty, dice, iou, sensitivity, precision and
surface Dice are 1.0 and all distances 0.0 (a correct "nothing there"). When *exactly one* is empty, the four
overlap metrics and surface Dice are 0.0 and the distances (HD95, HD, ASSD) are NaN: undefined, not infinite, so
they never poison a mean; the summary counts them (``hd95_mm_n_undefined``) instead. The relative volume error
``(V_pred - V_ref) / V_ref`` is 0.0 when both are empty and NaN when only the reference is.

Surfaces. The surface of a mask is the mask minus its binary erosion with the 6-connected (face) structuring
element, so a voxel is on the surface when one of its 6 face neighbours is background; voxels on the array border
count as surface (outside the array is background). Distances are Euclidean between voxel centres in mm, computed
with ``scipy.ndimage.distance_transform_edt(~surface_other, sampling=spacing_zyx)`` and read at this mask's surface
voxels, i.e. the distance from each surface voxel to the *surface* of the other mask (not to its interior: a
prediction lying inside the reference still has a non-zero distance). Both masks are cropped to their joint
bounding box plus one voxel first; distances between voxels inside the box do not depend on the crop. For a large
box with sparse surfaces (an organ) the same exact distances come from a k-d tree over the surface voxel centres
(``scipy.spatial.cKDTree``), about ten times faster than the distance transform there.

* ``hd95_mm``: the 95th percentile (numpy's linear interpolation) of the *union* of both directed surface-distance
  sets, as MedPy's ``hd95``. MONAI (``percentile=95``) and DeepMind's ``surface-distance`` instead take the larger of
  the two directed 95th percentiles, which is >= this value; they agree when the masks are symmetric.
* ``hd_mm``: the classical (100 %) symmetric Hausdorff distance, the maximum over both sets.
* ``assd_mm``: the mean over the union of both sets (MONAI's symmetric average surface distance; MedPy instead
  averages the two directed means, which differs when the surfaces have different voxel counts).
* ``surface_dice`` (normalised surface distance, Nikolov et al. 2021) at ``tolerance_mm``: the fraction of surface
  voxels of both masks lying within ``<= tolerance_mm`` (+1e-6 mm for float rounding) of the other surface,
  counted in voxels (MONAI's variant; DeepMind's weights surface elements by area).

"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from ..masks import bounding_box, join_boxes

METRIC_KEYS = (
    "dice", "iou", "sensitivity", "precision", "hd95_mm", "hd_mm", "assd_mm", "surface_dice",
    "volume_pred_ml", "volume_ref_ml", "relative_volume_error",
)
COUNT_KEYS = ("tp_voxels", "fp_voxels", "fn_voxels")
DISTANCE_KEYS = ("hd95_mm", "hd_mm", "assd_mm")
EDT_MAX_VOXELS = 2_000_000  # larger boxes may use a k-d tree over surface voxels (same distances, faster)
KDTREE_SPARSITY = 8  # ... when fewer than 1/8 of the box's voxels are surface voxels
DISTANCE_EPS_MM = 1e-6  # a distance equal to the tolerance up to float rounding (0.6**2 + 0.8**2) still counts


def check_spacing(spacing: Sequence[float], ndim: int, name: str = "spacing_zyx") -> tuple[float, ...]:
    try:
        s = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of numbers (mm per voxel, array axis order), got {spacing!r}")
    if len(s) != ndim:
        raise ValueError(f"{name} has {len(s)} value(s) for a {ndim}D array; give one spacing per array axis")
    if not all(math.isfinite(v) and v > 0 for v in s):
        raise ValueError(f"{name} must be finite and > 0 (mm), got {s}")
    return s


def _as_mask(a: Any, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        return a
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise TypeError(f"{name} must be a boolean mask, got dtype {a.dtype}")
    if a.size and not np.isin(a, (0, 1)).all():
        raise ValueError(
            f"{name} must be a boolean mask (or hold only 0 and 1); got values beyond 0/1 (dtype {a.dtype})"
        )
    return a != 0


def check_pair(pred: Any, ref: Any, spacing_zyx: Sequence[float]) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    pred, ref = _as_mask(pred, "pred"), _as_mask(ref, "ref")
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref masks differ in shape: {pred.shape} vs {ref.shape}")
    if pred.ndim == 0:
        raise ValueError("pred and ref must be arrays of at least one dimension, got scalars")
    return pred, ref, check_spacing(spacing_zyx, pred.ndim)


def as_labels(a: Any, name: str) -> np.ndarray:
    a = np.asarray(a)
    if np.issubdtype(a.dtype, np.floating):
        if a.size and not (np.isfinite(a).all() and (np.rint(a) == a).all()):
            raise ValueError(f"{name} must hold integer label values, found non-integer values (dtype {a.dtype})")
        a = a.astype(np.int32)
    elif a.dtype == bool:
        a = a.astype(np.uint8)
    elif not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must be an integer label map, got dtype {a.dtype}")
    if a.size and a.min() < 0:
        raise ValueError(f"{name} holds negative label values (min {a.min()}); label values must be >= 0")
    return a


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], method: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (mm): from each pred surface voxel to ref's surface, and back.

    ``edt``: Euclidean distance transform of the other surface's complement over the (cropped) grid. ``kdtree``:
    nearest neighbour among the other surface's voxel centres in mm. Both are exact and give the same distances;
    ``auto`` takes the k-d tree when the grid is large and the surfaces sparse in it (an organ: 15 M voxels in the
    box, 0.3 M on the surfaces, ~10x faster), else the distance transform.
    """
    sp, sr = _surface(pred), _surface(ref)
    if method == "auto":
        n_surface = int(np.count_nonzero(sp)) + int(np.count_nonzero(sr))
        method = "kdtree" if pred.size > EDT_MAX_VOXELS and n_surface * KDTREE_SPARSITY < pred.size else "edt"
    if method == "edt":
        d_pred = ndimage.distance_transform_edt(~sr, sampling=spacing)[sp]
        d_ref = ndimage.distance_transform_edt(~sp, sampling=spacing)[sr]
    elif method == "kdtree":
        from scipy.spatial import cKDTree

        s = np.asarray(spacing, dtype=np.float64)
        p_mm, r_mm = np.argwhere(sp) * s, np.argwhere(sr) * s
        d_pred = cKDTree(r_mm).query(p_mm)[0]
        d_ref = cKDTree(p_mm).query(r_mm)[0]
    else:
        raise ValueError(f"method must be 'auto', 'edt' or 'kdtree', got {method!r}")
    return d_pred, d_ref


def binary_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float], tolerance_mm: float = 1.0
) -> dict[str, float]:
    """Overlap, surface-distance and volume metrics of one binary prediction against its reference.

    Parameters
    ----------
    pred, ref : ndarray of bool
        Masks of equal shape (0/1 integer arrays are accepted), axes in the order of ``spacing_zyx``.
    spacing_zyx : sequence of float
        Voxel size in mm per array axis, (z, y, x) for a volume.
    tolerance_mm : float
        Distance at which a surface voxel counts as agreeing for ``surface_dice``.

    Returns
    -------
    dict
        ``dice, iou, sensitivity, precision, hd95_mm, hd_mm, assd_mm, surface_dice, volume_pred_ml, volume_ref_ml,
        relative_volume_error`` (floats) and ``tp_voxels, fp_voxels, fn_voxels`` (ints). Conventions for empty
        masks and the distance definitions are in the module docstring.

    Examples
    --------
    Two one-voxel-thick plates three slices apart, 2 mm slices: every surface distance is 6 mm.

    >>> ref = np.zeros((8, 4, 4), bool); ref[2] = True
    >>> pred = np.zeros_like(ref); pred[5] = True
    >>> m = binary_metrics(pred, ref, (2.0, 1.0, 1.0), tolerance_mm=1.0)
    >>> m["dice"], m["hd95_mm"], m["assd_mm"], m["surface_dice"]
    (0.0, 6.0, 6.0, 0.0)
    """
    pred, ref, spacing = check_pair(pred, ref, spacing_zyx)
    tolerance_mm = float(tolerance_mm)
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ValueError(f"tolerance_mm must be finite and >= 0, got {tolerance_mm}")
    box = join_boxes([bounding_box(pred), bounding_box(ref)], pred.shape, margin=1)
    voxel_ml = math.prod(spacing) / 1000.0
    if box is None:
        return {
            "dice": 1.0, "iou": 1.0, "sensitivity": 1.0, "precision": 1.0, "hd95_mm": 0.0, "hd_mm": 0.0,
            "assd_mm": 0.0, "surface_dice": 1.0, "volume_pred_ml": 0.0, "volume_ref_ml": 0.0,
            "relative_volume_error": 0.0, "tp_voxels": 0, "fp_voxels": 0, "fn_voxels": 0,
        }
    p, r = pred[box], ref[box]
    n_pred, n_ref = int(np.count_nonzero(p)), int(np.count_nonzero(r))
    tp = int(np.count_nonzero(p & r))
    out: dict[str, float] = {}
    if n_pred == 0 or n_ref == 0:
        out.update(dice=0.0, iou=0.0, sensitivity=0.0, precision=0.0)
        out.update(hd95_mm=math.nan, hd_mm=math.nan, assd_mm=math.nan, surface_dice=0.0)
    else:
        out.update(
            dice=2.0 * tp / (n_pred + n_ref), iou=tp / (n_pred + n_ref - tp), sensitivity=tp / n_ref,
            precision=tp / n_pred,
        )
        d_pred, d_ref = _surface_distances(p, r, spacing)
        both = np.concatenate([d_pred, d_ref])
        out.update(
            hd95_mm=float(np.percentile(both, 95)),
            hd_mm=float(both.max()),
            assd_mm=float(both.mean()),
            surface_dice=float(np.count_nonzero(both <= tolerance_mm + DISTANCE_EPS_MM)) / both.size,
        )
    out.update(
        volume_pred_ml=n_pred * voxel_ml,
        volume_ref_ml=n_ref * voxel_ml,
        relative_volume_error=(n_pred - n_ref) / n_ref if n_ref else math.nan,
        tp_voxels=tp, fp_voxels=n_pred - tp, fn_voxels=n_ref - tp,
    )
    return out
