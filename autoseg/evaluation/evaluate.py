"""Evaluation: overlap, surface and volume metrics per label and region, and lesion-level detection for tumours.

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

Regions. A label given as a list in ``dataset.json`` is a region (union of its values). Without explicit regions,
every organ/tumour pair named ``X`` and ``X_tumor``/``X_tumour`` gets the region ``X_region`` = both values: for the
5-label abdomen set ``liver_region`` = [1, 2] and ``kidney_region`` = [3, 4] (the KiTS convention: the kidney
includes its tumour).

Lesions (tumour labels only). Lesions are the connected components of the label's mask with 26-connectivity (face,
edge or corner neighbours), separately in reference and prediction. For a reference lesion ``r``, let ``U`` be the
union of all predicted components that overlap it; its IoU is ``|r n U| / |r u U|``. The lesion is

* *detected (IoU)* when that IoU is > 0.5: a lesion split into two predicted halves counts as found, while one
  prediction merging two lesions usually does not (the merged blob is much larger than either lesion);
* *detected (any)* when any predicted voxel of the label overlaps it.

A predicted component is *matched (any)* when it overlaps a reference lesion, *matched (IoU)* when it overlaps a
reference lesion that is detected (IoU), and a *false positive* when it overlaps no reference lesion at all.
Lesion size is the equivalent diameter ``(6 V / pi) ** (1/3)`` mm of the sphere with the lesion's volume, binned
``<10mm`` (d < 10), ``10-20mm`` (10 <= d <= 20) and ``>20mm`` (d > 20); ``>=10mm`` joins the two larger bins.
Over a dataset, per criterion and bin: recall = detected reference lesions / reference lesions (binned by the
reference lesion's size), precision = matched predicted lesions / predicted lesions (binned by the predicted
lesion's size), F1 = 2PR / (P + R). Recall is NaN without reference lesions, precision NaN without predicted
ones; F1 is 0.0 when one side is empty and the other is not, NaN when both are.

Dataset summary. Per label/region: mean and median Dice over cases, *global* Dice pooled over voxels
(``2 sum TP / (sum |P| + sum |R|)``), and the mean of every other metric ignoring NaN.

Output files of ``autoseg evaluate`` (in ``-o``, default the prediction folder)
------------------------------------------------------------------------------
* ``evaluation.csv``: long format, one row per (case, label or region) with every metric and the voxel counts.
* ``lesions.csv``: one row per lesion (``source`` = reference or predicted) with its size and match flags.
* ``summary.json``: the dataset summary; undefined values (NaN) are written as ``null``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from ..atomic import atomic_path, write_json
from ..io.images import DIRECTION_ATOL, SPACING_ORIGIN_RTOL, Geometry, load_dataset_json, read_header, read_image
from ..errors import AutosegError
from ..parallel import map_cases

__all__ = [
    "SIZE_BINS",
    "binary_metrics",
    "lesion_detection",
    "size_bin",
    "equivalent_diameter_mm",
    "structures_from_labels",
    "default_regions",
    "tumour_label_values",
    "evaluate_case",
    "detection_stats",
    "summarize",
    "evaluate_folders",
    "format_summary",
    "resolve_labels",
    "add_cli",
    "run_cli",
]

SIZE_BINS = ("<10mm", "10-20mm", ">20mm")
DETECTION_BINS = ("all",) + SIZE_BINS + (">=10mm",)
CRITERIA = ("iou", "any")
IOU_THRESHOLD = 0.5
METRIC_KEYS = (
    "dice", "iou", "sensitivity", "precision", "hd95_mm", "hd_mm", "assd_mm", "surface_dice",
    "volume_pred_ml", "volume_ref_ml", "relative_volume_error",
)
COUNT_KEYS = ("tp_voxels", "fp_voxels", "fn_voxels")
DISTANCE_KEYS = ("hd95_mm", "hd_mm", "assd_mm")
_TUMOUR_RE = re.compile(r"^(?:(?P<organ>.+?)[ _\-]?)?(tumou?rs?|lesions?)$", re.IGNORECASE)
DEFAULT_WORKERS = max(1, min(4, os.cpu_count() or 1))
EDT_MAX_VOXELS = 2_000_000  # larger boxes may use a k-d tree over surface voxels (same distances, faster)
KDTREE_SPARSITY = 8  # ... when fewer than 1/8 of the box's voxels are surface voxels
DISTANCE_EPS_MM = 1e-6  # a distance equal to the tolerance up to float rounding (0.6**2 + 0.8**2) still counts


# ----------------------------------------------------------------------------------------------------------------
# Input checks


def dice_per_label(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int]) -> dict[str, float]:
    """Dice per label value of two label maps; 1.0 when both lack the label, 0.0 when exactly one has it.

    The cheap score used during training validation and model selection; :func:`binary_metrics` gives the rest.

    >>> dice_per_label(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), [1, 2, 3])
    {'1': 0.6666666666666666, '2': 0.6666666666666666, '3': 1.0}
    """
    out = {}
    for v in labels:
        p, r = pred == v, ref == v
        denom = int(p.sum()) + int(r.sum())
        out[str(v)] = 1.0 if denom == 0 else 2.0 * int(np.logical_and(p, r).sum()) / denom
    return out


def _check_spacing(spacing: Sequence[float], ndim: int, name: str = "spacing_zyx") -> tuple[float, ...]:
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


def _check_pair(pred: Any, ref: Any, spacing_zyx: Sequence[float]) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    pred, ref = _as_mask(pred, "pred"), _as_mask(ref, "ref")
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref masks differ in shape: {pred.shape} vs {ref.shape}")
    if pred.ndim == 0:
        raise ValueError("pred and ref must be arrays of at least one dimension, got scalars")
    return pred, ref, _check_spacing(spacing_zyx, pred.ndim)


def _as_labels(a: Any, name: str) -> np.ndarray:
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


# ----------------------------------------------------------------------------------------------------------------
# Binary metrics


def _box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of a boolean mask (one C pass via ``find_objects``), None when empty."""
    found = ndimage.find_objects(mask.view(np.uint8), max_label=1)
    return found[0] if found else None


def _join(boxes: Sequence[tuple[slice, ...] | None], shape: tuple[int, ...], margin: int) -> tuple[slice, ...] | None:
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    return tuple(
        slice(max(min(b[ax].start for b in boxes) - margin, 0), min(max(b[ax].stop for b in boxes) + margin, n))
        for ax, n in enumerate(shape)
    )


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
    pred, ref, spacing = _check_pair(pred, ref, spacing_zyx)
    tolerance_mm = float(tolerance_mm)
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ValueError(f"tolerance_mm must be finite and >= 0, got {tolerance_mm}")
    box = _join([_box(pred), _box(ref)], pred.shape, margin=1)
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


# ----------------------------------------------------------------------------------------------------------------
# Lesions


def equivalent_diameter_mm(volume_mm3: float | np.ndarray) -> float | np.ndarray:
    """Diameter (mm) of the sphere with the given volume (mm^3): ``(6 V / pi) ** (1/3)``.

    >>> round(float(equivalent_diameter_mm(4 / 3 * np.pi * 5 ** 3)), 6)
    10.0
    """
    return np.cbrt(6.0 * np.asarray(volume_mm3, dtype=np.float64) / np.pi)


def size_bin(diameter_mm: float) -> str:
    """Size bin of a lesion by its equivalent diameter: ``<10mm`` (d < 10), ``10-20mm`` (10 <= d <= 20), ``>20mm``.

    >>> size_bin(9.99), size_bin(10.0), size_bin(20.0), size_bin(20.01)
    ('<10mm', '10-20mm', '10-20mm', '>20mm')
    """
    d = float(diameter_mm)
    if math.isnan(d):
        raise ValueError("diameter_mm is NaN; a lesion size must be a number")
    return SIZE_BINS[0] if d < 10.0 else SIZE_BINS[1] if d <= 20.0 else SIZE_BINS[2]


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Labelled components of a boolean mask and their count, with full connectivity (26 in 3D): lesions that
    touch diagonally are one lesion, everywhere in autoseg (evaluation, postprocessing, report)."""
    return ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))


def _lesion_rows(
    cc: np.ndarray, n: int, voxel_mm3: float, offset: Sequence[int]
) -> tuple[list[dict[str, Any]], np.ndarray]:
    sizes = np.bincount(cc.ravel(), minlength=n + 1)
    rows = []
    if n:
        centroids = np.asarray(ndimage.center_of_mass(cc > 0, cc, np.arange(1, n + 1)), dtype=np.float64)
        centroids = centroids.reshape(n, cc.ndim) + np.asarray(offset, dtype=np.float64)
        diameters = equivalent_diameter_mm(sizes[1:] * voxel_mm3)
        for i in range(n):
            rows.append({
                "lesion": i + 1,
                "voxels": int(sizes[i + 1]),
                "volume_ml": float(sizes[i + 1] * voxel_mm3 / 1000.0),
                "diameter_mm": float(diameters[i]),
                "size_bin": size_bin(diameters[i]),
                "centroid_index": [round(float(c), 2) for c in centroids[i]],
            })
    return rows, sizes


def _lesion_detection(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], iou_threshold: float, offset: Sequence[int]
) -> dict[str, Any]:
    box = _join([_box(pred), _box(ref)], pred.shape, margin=0)
    if box is None:
        return {"reference": [], "predicted": [], "false_positives": 0}
    offset = [o + b.start for o, b in zip(offset, box)]
    p, r = pred[box], ref[box]
    ref_cc, n_ref = connected_components(r)
    pred_cc, n_pred = connected_components(p)
    voxel_mm3 = math.prod(spacing)
    ref_rows, ref_size = _lesion_rows(ref_cc, n_ref, voxel_mm3, offset)
    pred_rows, pred_size = _lesion_rows(pred_cc, n_pred, voxel_mm3, offset)

    # Every (reference lesion, predicted lesion) pair that shares voxels, with the number of shared voxels.
    both = (ref_cc > 0) & (pred_cc > 0)
    keys, shared = np.unique(ref_cc[both].astype(np.int64) * (n_pred + 1) + pred_cc[both], return_counts=True)
    pair_ref, pair_pred = np.divmod(keys, n_pred + 1)
    inter = np.bincount(pair_ref, weights=shared, minlength=n_ref + 1)  # |r n U|, predicted lesions are disjoint
    union_pred = np.bincount(pair_ref, weights=pred_size[pair_pred], minlength=n_ref + 1)  # |U|
    n_overlapping = np.bincount(pair_ref, minlength=n_ref + 1)
    denominator = ref_size + union_pred - inter
    iou = np.divide(inter, denominator, out=np.zeros(n_ref + 1), where=denominator > 0)
    detected_iou = iou > iou_threshold
    matched_any = np.zeros(n_pred + 1, dtype=bool)
    matched_any[pair_pred] = True
    matched_iou = np.zeros(n_pred + 1, dtype=bool)
    matched_iou[pair_pred[detected_iou[pair_ref]]] = True

    for i, row in enumerate(ref_rows, start=1):
        row.update(
            iou=float(iou[i]), n_overlapping=int(n_overlapping[i]), detected_iou=bool(detected_iou[i]),
            detected_any=bool(n_overlapping[i] > 0),
        )
    for i, row in enumerate(pred_rows, start=1):
        row.update(
            matched_iou=bool(matched_iou[i]), matched_any=bool(matched_any[i]), false_positive=not matched_any[i]
        )
    return {"reference": ref_rows, "predicted": pred_rows, "false_positives": int(n_pred - matched_any[1:].sum())}


def lesion_detection(
    pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float], iou_threshold: float = IOU_THRESHOLD
) -> dict[str, Any]:
    """Match the connected lesions (26-connectivity) of a predicted and a reference tumour mask.

    Parameters
    ----------
    pred, ref : ndarray of bool
        Tumour masks of equal shape.
    spacing_zyx : sequence of float
        Voxel size in mm per array axis.
    iou_threshold : float
        A reference lesion is detected (IoU) when its IoU with the union of the predicted lesions overlapping it
        is strictly greater than this (default 0.5).

    Returns
    -------
    dict
        ``reference``: one dict per reference lesion (``lesion`` id, ``voxels``, ``volume_ml``, ``diameter_mm``
        (equivalent sphere), ``size_bin``, ``centroid_index`` (array axis order), ``iou``, ``n_overlapping``,
        ``detected_iou``, ``detected_any``); ``predicted``: one dict per predicted lesion (same size fields plus
        ``matched_iou``, ``matched_any``, ``false_positive``); ``false_positives``: predicted lesions overlapping no
        reference lesion.

    Examples
    --------
    One reference lesion predicted as two halves: still detected at IoU > 0.5; a stray blob is a false positive.

    >>> ref = np.zeros((1, 3, 12), bool); ref[0, 1, 1:9] = True
    >>> pred = np.zeros_like(ref); pred[0, 1, 1:4] = pred[0, 1, 5:9] = True; pred[0, 1, 11] = True
    >>> d = lesion_detection(pred, ref, (1.0, 1.0, 1.0))
    >>> d["reference"][0]["iou"], d["reference"][0]["detected_iou"], d["false_positives"]
    (0.875, True, 1)
    """
    pred, ref, spacing = _check_pair(pred, ref, spacing_zyx)
    return _lesion_detection(pred, ref, spacing, float(iou_threshold), [0] * pred.ndim)


# ----------------------------------------------------------------------------------------------------------------
# One case


def _check_label_map(labels: Mapping[str, Any]) -> dict[str, int | tuple[int, ...]]:
    if not isinstance(labels, Mapping) or not labels:
        raise ValueError(f"labels must be a non-empty mapping name -> value or list of values, got {labels!r}")
    out: dict[str, int | tuple[int, ...]] = {}
    for name, v in labels.items():
        values = v if isinstance(v, (list, tuple)) else [v]
        if not values or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 0
                                 for x in values):
            raise ValueError(f"label {name!r} must be a non-negative integer or a list of them, got {v!r}")
        out[str(name)] = tuple(int(x) for x in values) if isinstance(v, (list, tuple)) else int(v)
    return out


def default_regions(labels: Mapping[str, Any]) -> dict[str, list[int]]:
    """Organ regions that include their tumour: for each pair ``X`` / ``X_tumor`` (or ``X_tumour``, ``X tumor``,
    ``X_lesion``), ``X_region`` = [X, X_tumor].

    >>> default_regions({"background": 0, "liver": 1, "liver_tumor": 2, "kidney": 3, "kidney_tumor": 4})
    {'liver_region': [1, 2], 'kidney_region': [3, 4]}
    """
    plain = {n.lower(): (n, v) for n, v in _check_label_map(labels).items() if isinstance(v, int) and v != 0}
    regions = {}
    for name, value in _check_label_map(labels).items():
        m = _TUMOUR_RE.match(name)
        if isinstance(value, int) and value != 0 and m and (m.group("organ") or "").lower() in plain:
            organ, organ_value = plain[m.group("organ").lower()]
            regions[f"{organ}_region"] = [organ_value, value]
    return regions


def tumour_label_values(labels: Mapping[str, Any]) -> list[int]:
    """Values of the single-value labels whose name ends in tumor/tumour/lesion (e.g. ``liver_tumor``).

    >>> tumour_label_values({"background": 0, "liver": 1, "liver_tumor": 2, "kidney": 3, "kidney_tumour": 4})
    [2, 4]
    """
    return sorted(v for n, v in _check_label_map(labels).items() if isinstance(v, int) and v and _TUMOUR_RE.match(n))


def structures_from_labels(
    labels: Mapping[str, Any], regions: Mapping[str, Sequence[int]] | None = None
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Everything to evaluate: ``name -> (kind, values)`` with kind ``label`` or ``region``.

    Single-value labels other than background (0) are labels; list-valued labels (region-based dataset.json)
    are regions; then ``regions`` (default :func:`default_regions`) are added.

    >>> structures_from_labels({"background": 0, "kidney": 3, "kidney_tumor": 4})
    {'kidney': ('label', (3,)), 'kidney_tumor': ('label', (4,)), 'kidney_region': ('region', (3, 4))}
    """
    checked = _check_label_map(labels)
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, v in checked.items():
        if isinstance(v, int):
            if v != 0:
                out[name] = ("label", (v,))
        else:
            values = tuple(sorted(set(v) - {0}))
            if values:
                out[name] = ("region", values)
    extra = default_regions(labels) if regions is None else regions
    for name, values in extra.items():
        vals = _check_label_map({name: list(values)})[name]
        if name in out and out[name][0] == "label":
            raise ValueError(f"region name {name!r} is already a label name; rename the region")
        out[name] = ("region", tuple(sorted(set(vals) - {0})))
    return out


def label_boxes(arr: np.ndarray, max_label: int) -> list[tuple[slice, ...] | None]:
    """Bounding box of each label value 1..max_label (index value - 1), None for a value not present."""
    boxes = ndimage.find_objects(arr, max_label=max_label) if max_label > 0 else []
    return list(boxes) + [None] * (max_label - len(boxes))


def evaluate_case(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    spacing_zyx: Sequence[float],
    labels: Mapping[str, Any],
    regions: Mapping[str, Sequence[int]] | None = None,
    tumour_labels: Sequence[int] | None = None,
    tolerance_mm: float = 1.0,
) -> dict[str, Any]:
    """Metrics of every label and region of one case, and lesion matching for the tumour labels.

    Parameters
    ----------
    pred_labels, ref_labels : ndarray of int
        Label maps of equal shape.
    spacing_zyx : sequence of float
        Voxel size in mm per array axis.
    labels : dict
        ``dataset.json`` ``labels``: name -> value (a label) or list of values (a region); background is skipped.
    regions : dict, optional
        Extra regions name -> values; default :func:`default_regions` (``liver_region`` = [1, 2],
        ``kidney_region`` = [3, 4] for the abdomen set).
    tumour_labels : list of int, optional
        Label values to match lesion by lesion; default :func:`tumour_label_values`.
    tolerance_mm : float
        Surface Dice tolerance.

    Returns
    -------
    dict
        ``structures``: name -> ``{"kind", "values", **binary_metrics}``; ``lesions``: tumour label name ->
        :func:`lesion_detection` result (centroids in full-array indices).

    Examples
    --------
    >>> ref = np.zeros((4, 4, 4), np.uint8); ref[1:3, 1:3, 1:3] = 3; ref[1, 1, 1] = 4
    >>> pred = np.where(ref > 0, 3, 0).astype(np.uint8)  # kidney right, tumour called kidney
    >>> r = evaluate_case(pred, ref, (1, 1, 1), {"background": 0, "kidney": 3, "kidney_tumor": 4})
    >>> r["structures"]["kidney_region"]["dice"], r["structures"]["kidney_tumor"]["dice"]
    (1.0, 0.0)
    """
    pred_labels, ref_labels = _as_labels(pred_labels, "pred_labels"), _as_labels(ref_labels, "ref_labels")
    if pred_labels.shape != ref_labels.shape:
        raise ValueError(f"pred_labels and ref_labels differ in shape: {pred_labels.shape} vs {ref_labels.shape}")
    spacing = _check_spacing(spacing_zyx, ref_labels.ndim)
    structures = structures_from_labels(labels, regions)
    names = {v: n for n, v in _check_label_map(labels).items() if isinstance(v, int)}
    tumours = tumour_label_values(labels) if tumour_labels is None else [int(v) for v in tumour_labels]
    max_label = max([v for _, vs in structures.values() for v in vs] + tumours + [0])
    pred_boxes, ref_boxes = label_boxes(pred_labels, max_label), label_boxes(ref_labels, max_label)
    shape = ref_labels.shape

    def crop(values: Sequence[int]) -> tuple[np.ndarray, np.ndarray, tuple[slice, ...]]:
        box = _join([b[v - 1] for b in (pred_boxes, ref_boxes) for v in values], shape, margin=0)
        if box is None:
            empty = np.zeros((1,) * len(shape), dtype=bool)
            return empty, empty, tuple(slice(0, 1) for _ in shape)
        p, r = pred_labels[box], ref_labels[box]
        if len(values) == 1:
            return p == values[0], r == values[0], box
        return np.isin(p, values), np.isin(r, values), box

    result: dict[str, Any] = {"structures": {}, "lesions": {}}
    for name, (kind, values) in structures.items():
        p, r, _ = crop(values)
        metrics = binary_metrics(p, r, spacing, tolerance_mm)
        result["structures"][name] = {"kind": kind, "values": list(values), **metrics}
    for value in tumours:
        p, r, box = crop([value])
        result["lesions"][names.get(value, f"label_{value}")] = _lesion_detection(
            p, r, spacing, IOU_THRESHOLD, [b.start for b in box]
        )
    return result


# ----------------------------------------------------------------------------------------------------------------
# Dataset summary


def _f1(precision: float, recall: float, n_ref: int, n_pred: int) -> float:
    if n_ref == 0 and n_pred == 0:
        return math.nan
    if n_ref == 0 or n_pred == 0 or precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def detection_stats(reference: Sequence[Mapping[str, Any]], predicted: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Lesion detection counts, recall, precision and F1 per criterion (``iou``, ``any``) and size bin.

    ``reference`` / ``predicted`` are lesion rows as :func:`lesion_detection` returns them (any number of cases).
    Bins: ``all``, ``<10mm``, ``10-20mm``, ``>20mm``, ``>=10mm``; references are binned by their own size,
    predictions by theirs.

    >>> ref = [{"size_bin": "<10mm", "detected_iou": False, "detected_any": True},
    ...        {"size_bin": ">20mm", "detected_iou": True, "detected_any": True}]
    >>> pred = [{"size_bin": ">20mm", "matched_iou": True, "matched_any": True},
    ...         {"size_bin": "<10mm", "matched_iou": False, "matched_any": False}]
    >>> s = detection_stats(ref, pred)
    >>> s["iou"]["all"]["recall"], s["iou"]["all"]["precision"], s["any"][">=10mm"]["recall"]
    (0.5, 0.5, 1.0)
    """
    members = {"all": set(SIZE_BINS), ">=10mm": {SIZE_BINS[1], SIZE_BINS[2]}}
    members.update({b: {b} for b in SIZE_BINS})
    out: dict[str, Any] = {}
    for crit in CRITERIA:
        out[crit] = {}
        for b in DETECTION_BINS:
            refs = [r for r in reference if r["size_bin"] in members[b]]
            preds = [p for p in predicted if p["size_bin"] in members[b]]
            n_det = sum(bool(r[f"detected_{crit}"]) for r in refs)
            n_match = sum(bool(p[f"matched_{crit}"]) for p in preds)
            recall = n_det / len(refs) if refs else math.nan
            precision = n_match / len(preds) if preds else math.nan
            out[crit][b] = {
                "n_reference": len(refs), "n_detected": n_det, "recall": recall,
                "n_predicted": len(preds), "n_predicted_matched": n_match, "precision": precision,
                "f1": _f1(precision, recall, len(refs), len(preds)),
            }
    return out


def summarize(per_case: Any, lesions: Any, n_cases: int, tolerance_mm: float = 1.0) -> dict[str, Any]:
    """Dataset summary from the per-case frame and lesion frame that :func:`evaluate_folders` builds.

    Per label/region: ``n_cases``, ``dice_mean``, ``dice_median``, ``dice_global`` (voxel-pooled), the mean of
    every other metric (NaN ignored) and ``<distance>_n_undefined`` (cases where it is NaN), under ``structures``.
    Per tumour label, under ``lesion_detection``: ``false_positives``, ``false_positives_per_case`` and the
    ``iou`` / ``any`` entries of :func:`detection_stats`.
    """
    structures: dict[str, Any] = {}
    for name, g in per_case.groupby("structure", sort=False):
        denom = float(g["fp_voxels"].sum() + g["fn_voxels"].sum() + 2 * g["tp_voxels"].sum())
        s: dict[str, Any] = {
            "kind": str(g["kind"].iloc[0]), "values": str(g["values"].iloc[0]), "n_cases": int(len(g)),
            "dice_mean": float(g["dice"].mean()), "dice_median": float(g["dice"].median()),
            "dice_global": 2.0 * float(g["tp_voxels"].sum()) / denom if denom else math.nan,
        }
        for key in METRIC_KEYS:
            if key != "dice":
                col = g[key].astype(float)
                s[f"{key}_mean"] = float(col.mean()) if col.notna().any() else math.nan
        for key in DISTANCE_KEYS:
            s[f"{key}_n_undefined"] = int(g[key].isna().sum())
        structures[str(name)] = s
    detection: dict[str, Any] = {}
    if len(lesions):
        for name, g in lesions.groupby("structure", sort=False):
            refs = g[g["source"] == "reference"].to_dict("records")
            preds = g[g["source"] == "predicted"].to_dict("records")
            fp = sum(bool(p["false_positive"]) for p in preds)
            detection[str(name)] = {
                "false_positives": fp, "false_positives_per_case": fp / n_cases if n_cases else math.nan,
                **detection_stats(refs, preds),
            }
    return {
        "n_cases": int(n_cases), "tolerance_mm": float(tolerance_mm), "structures": structures,
        "lesion_detection": detection,
        "definitions": {
            "dice_global": "2 * sum TP / (sum |pred| + sum |ref|) over all cases (voxel-pooled)",
            "hd95_mm": "95th percentile of the union of both directed surface-distance sets (MedPy hd95)",
            "assd_mm": "mean of the union of both directed surface-distance sets",
            "surface_dice": "share of both surfaces within tolerance_mm of the other surface (voxel counts)",
            "empty": "both empty: overlap metrics 1, distances 0; one empty: overlap 0, distances NaN (null)",
            "lesion": "26-connected component; detected (iou) when IoU with the union of overlapping predicted "
            "components > 0.5; detected (any) on any overlap; false positive: overlaps no reference lesion",
            "size_bin": "equivalent sphere diameter: <10mm, 10-20mm (inclusive), >20mm",
        },
    }


# ----------------------------------------------------------------------------------------------------------------
# Folders


@dataclass(frozen=True)
class _CaseTask:
    """Everything one worker needs to evaluate one case (picklable)."""

    case: str
    ref: str
    pred: str
    labels: tuple[tuple[str, Any], ...]
    regions: tuple[tuple[str, tuple[int, ...]], ...] | None
    tumour_labels: tuple[int, ...] | None
    tolerance_mm: float

    def __str__(self) -> str:  # map_cases names the item in a memory error
        return f"case {self.case}"


def _case_files(folder: Path, ending: str) -> dict[str, Path]:
    return {
        p.name[: -len(ending)]: p
        for p in sorted(folder.iterdir())
        if p.name.endswith(ending) and len(p.name) > len(ending) and not p.name.startswith(".") and p.is_file()
    }


def _geometry_mismatch(pred: Path, pred_geo: Geometry, ref: Path, ref_geo: Geometry) -> str | None:
    if tuple(pred_geo.shape) != tuple(ref_geo.shape):
        return f"{pred}: shape {tuple(pred_geo.shape)} (z, y, x) differs from reference {ref} {tuple(ref_geo.shape)}"
    for field, tol, relative in (("spacing", SPACING_ORIGIN_RTOL, True), ("origin", SPACING_ORIGIN_RTOL, True),
                                 ("direction", DIRECTION_ATOL, False)):
        a, b = getattr(pred_geo, field), getattr(ref_geo, field)
        if len(a) != len(b) or any(abs(x - y) > tol * (max(abs(x), abs(y), 1.0) if relative else 1.0)
                                   for x, y in zip(a, b)):
            return (f"{pred}: {field} {tuple(v + 0.0 for v in a)} differs from reference {ref} "
                    f"{tuple(v + 0.0 for v in b)}")
    return None


_GRID_FIX = "; predictions must lie on the reference grid (export them with the reference image's geometry)"


def _evaluate_task(task: _CaseTask) -> dict[str, Any]:
    ref, ref_geo = read_image(task.ref)
    pred, pred_geo = read_image(task.pred)
    problem = _geometry_mismatch(Path(task.pred), pred_geo, Path(task.ref), ref_geo)
    if problem:
        raise AutosegError(problem + _GRID_FIX)
    try:
        result = evaluate_case(
            pred, ref, ref_geo.spacing_zyx, dict(task.labels),
            None if task.regions is None else dict(task.regions), task.tumour_labels, task.tolerance_mm,
        )
    except ValueError as e:
        raise AutosegError(f"case {task.case} ({task.pred} vs {task.ref}): {e}") from None
    result["case"] = task.case
    return result


def _frames(results: list[dict[str, Any]]) -> tuple[Any, Any]:
    import pandas as pd

    rows, lesion_rows = [], []
    for res in results:
        for name, m in res["structures"].items():
            rows.append({"case": res["case"], "structure": name, "kind": m["kind"],
                         "values": "+".join(map(str, m["values"])),
                         **{k: m[k] for k in METRIC_KEYS + COUNT_KEYS}})
        for name, d in res["lesions"].items():
            for source in ("reference", "predicted"):
                for les in d[source]:
                    row = {"case": res["case"], "structure": name, "source": source, **les}
                    row["centroid_index"] = " ".join(f"{c:g}" for c in les["centroid_index"])
                    lesion_rows.append(row)
    columns = ["case", "structure", "kind", "values", *METRIC_KEYS, *COUNT_KEYS]
    lesion_columns = ["case", "structure", "source", "lesion", "voxels", "volume_ml", "diameter_mm", "size_bin",
                      "centroid_index", "iou", "n_overlapping", "detected_iou", "detected_any", "matched_iou",
                      "matched_any", "false_positive"]
    lesions = pd.DataFrame(lesion_rows, columns=lesion_columns)
    lesions = lesions.astype({"n_overlapping": "Int64", **{c: "boolean" for c in lesion_columns[-5:]}})
    return pd.DataFrame(rows, columns=columns), lesions


def evaluate_folders(
    ref_dir: str | Path,
    pred_dir: str | Path,
    labels: Mapping[str, Any],
    file_ending: str = ".nii.gz",
    num_workers: int = 1,
    tolerance_mm: float = 1.0,
    regions: Mapping[str, Sequence[int]] | None = None,
    tumour_labels: Sequence[int] | None = None,
    progress: bool = True,
    return_lesions: bool = False,
) -> tuple[Any, dict[str, Any]] | tuple[Any, dict[str, Any], Any]:
    """Evaluate every reference case ``REF_DIR/CASE<file_ending>`` against ``PRED_DIR/CASE<file_ending>``.

    All problems are found before any metric is computed and raised together as one :class:`AutosegError`:
    predictions missing for a reference case (listed by case name), and predictions whose shape, spacing, origin
    or direction differ from their reference (naming both files). Predictions without a reference are ignored
    (listed in ``summary["unmatched_predictions"]``). Cases run in ``num_workers`` processes.

    Returns
    -------
    per_case : pandas.DataFrame
        Long format: one row per (case, structure), columns ``case, structure, kind, values`` and every metric
        of :func:`binary_metrics`.
    summary : dict
        :func:`summarize`, plus ``cases`` and ``unmatched_predictions``.
    lesions : pandas.DataFrame
        Only when ``return_lesions``: one row per lesion.
    """
    ref_dir, pred_dir = Path(ref_dir), Path(pred_dir)
    for what, folder in (("reference", ref_dir), ("prediction", pred_dir)):
        if not folder.is_dir():
            raise AutosegError(f"{folder}: {what} folder not found")
    checked = _check_label_map(labels)
    structures_from_labels(labels, regions)  # fail early on bad labels/regions
    refs, preds = _case_files(ref_dir, file_ending), _case_files(pred_dir, file_ending)
    if not refs:
        raise AutosegError(f"{ref_dir}: holds no reference label file CASE{file_ending}; is file_ending right?")
    missing = sorted(set(refs) - set(preds))
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} of {len(refs)} case(s) have no prediction in {pred_dir}: {', '.join(missing)} "
            f"(expected CASE{file_ending}); predict them or remove their references from {ref_dir}"
        )
    for case in sorted(set(refs) & set(preds)):
        try:
            mismatch = _geometry_mismatch(preds[case], read_header(preds[case]), refs[case], read_header(refs[case]))
        except AutosegError as e:
            problems.append(f"case {case}: {e}")
            continue
        if mismatch:
            problems.append(f"case {case}: {mismatch}{_GRID_FIX}")
    if problems:
        raise AutosegError(_problem_text(problems))
    tasks = [
        _CaseTask(
            case=c, ref=str(refs[c]), pred=str(preds[c]), labels=tuple(
                (n, list(v) if isinstance(v, tuple) else v) for n, v in checked.items()),
            regions=None if regions is None else tuple((n, tuple(v)) for n, v in regions.items()),
            tumour_labels=None if tumour_labels is None else tuple(int(v) for v in tumour_labels),
            tolerance_mm=float(tolerance_mm),
        )
        for c in sorted(refs)
    ]
    outcomes = map_cases(_evaluate_task, tasks, num_workers, desc="evaluate", progress=progress)
    errors = [err for _, err in outcomes if err is not None]
    if errors:
        raise AutosegError(_problem_text(errors))
    results = [res for res, _ in outcomes]
    per_case, lesions = _frames(results)
    summary = summarize(per_case, lesions, len(results), tolerance_mm)
    summary["cases"] = [r["case"] for r in results]
    summary["unmatched_predictions"] = sorted(set(preds) - set(refs))
    return (per_case, summary, lesions) if return_lesions else (per_case, summary)


def _problem_text(problems: list[str]) -> str:
    return f"{len(problems)} problem(s) prevent the evaluation:\n" + "\n".join(f"  - {p}" for p in problems)


# ----------------------------------------------------------------------------------------------------------------
# Output


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN/Inf floats replaced by None and numpy scalars by Python ones, for strict JSON."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_csv(path: Path, frame: Any) -> None:
    """Write a DataFrame as CSV atomically (NaN as an empty field)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_summary(summary: Mapping[str, Any]) -> str:
    """The compact table ``autoseg evaluate`` prints: per label/region mean Dice, global Dice, mean HD95 and
    surface Dice; per tumour label lesion recall (>= 10 mm, IoU > 0.5 and any overlap), precision and FP/case."""
    tol = summary.get("tolerance_mm", 1.0)
    lines = [f"{summary['n_cases']} case(s); surface Dice at {tol:g} mm", "",
             f"{'label / region':<22} {'kind':<6} {'Dice':>6} {'global':>7} {'HD95 mm':>8} {'surf.Dice':>9}"]
    for name, s in summary["structures"].items():
        lines.append(f"{name:<22} {s['kind']:<6} {_fmt(s['dice_mean']):>6} {_fmt(s['dice_global']):>7} "
                     f"{_fmt(s['hd95_mm_mean'], '.2f'):>8} {_fmt(s['surface_dice_mean']):>9}")
    if summary.get("lesion_detection"):
        lines += ["", f"{'tumour label':<22} {'lesions':>7} {'recall>=10mm':>12} {'(any)':>6} {'precision':>9} "
                      f"{'(any)':>6} {'F1':>6} {'FP/case':>7}"]
        for name, d in summary["lesion_detection"].items():
            big, big_any = d["iou"][">=10mm"], d["any"][">=10mm"]
            lines.append(
                f"{name:<22} {d['iou']['all']['n_reference']:>7} {_fmt(big['recall']):>12} "
                f"{_fmt(big_any['recall']):>6} {_fmt(d['iou']['all']['precision']):>9} "
                f"{_fmt(d['any']['all']['precision']):>6} {_fmt(d['iou']['all']['f1']):>6} "
                f"{_fmt(d['false_positives_per_case'], '.2f'):>7}"
            )
        lines.append("recall/precision/F1 at IoU > 0.5 unless marked (any) = any overlap")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Command line


def _read_labels_json(path: Path) -> dict[str, Any]:
    if path.is_dir() or path.name == "dataset.json":
        return load_dataset_json(path if path.is_dir() else path.parent)
    import json

    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AutosegError(f"{path}: cannot read labels JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("labels"), dict):
        raise AutosegError(
            f"{path}: needs a 'labels' object like dataset.json's, e.g. {{\"background\": 0, \"liver\": 1}}"
        )
    try:
        _check_label_map(meta["labels"])
    except ValueError as e:
        raise AutosegError(f"{path}: {e}") from None
    return meta


def resolve_labels(
    dataset: str | None, labels_path: str | Path | None, fallbacks: Sequence[Path] = ()
) -> tuple[dict[str, Any], str]:
    """``(labels, file_ending)`` from ``--labels`` (a dataset.json or any JSON with ``labels``), else from ``-d``
    (``AUTOSEG_RAW/<dataset>/dataset.json``), else from the first ``dataset.json`` found in ``fallbacks``."""
    from ..layout import Roots, dataset_name

    if labels_path is not None:
        meta = _read_labels_json(Path(labels_path))
    elif dataset is not None:
        roots = Roots.from_env()
        meta = load_dataset_json(roots.raw / dataset_name(dataset, roots.raw))
    else:
        found = [f for f in fallbacks if (f / "dataset.json").is_file()]
        if not found:
            looked = ", ".join(str(f / "dataset.json") for f in fallbacks) or "nowhere"
            raise AutosegError(f"no label definitions: pass -d DATASET or --labels dataset.json (looked in {looked})")
        meta = load_dataset_json(found[0])
    return dict(meta["labels"]), str(meta.get("file_ending", ".nii.gz"))


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {v}")
    return v


def _tolerance(text: str) -> float:
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


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``autoseg evaluate``."""
    p = subparsers.add_parser(
        "evaluate",
        help="compare predicted label maps with references: Dice, HD95, surface Dice, lesion detection",
        description="Evaluate PRED_DIR/CASE.nii.gz against REF_DIR/CASE.nii.gz for every reference case: per "
        "label and region (organ incl. tumour) Dice, IoU, sensitivity, precision, HD95, ASSD, surface Dice and "
        "volumes; per tumour label lesion-wise detection (IoU > 0.5 and any overlap) by lesion size. Writes "
        "evaluation.csv (one row per case and label/region), lesions.csv (one row per lesion) and summary.json.",
    )
    p.add_argument("-ref", "--ref", dest="ref", required=True, metavar="REF_DIR",
                   help="folder of reference label maps CASE<file_ending> (e.g. labelsTr/ or labelsTs/)")
    p.add_argument("-pred", "--pred", dest="pred", required=True, metavar="PRED_DIR",
                   help="folder of predicted label maps with the same file names and geometry")
    add_label_flags(p, "PRED_DIR or REF_DIR's parent (the raw dataset folder)")
    p.add_argument("-o", "--output", default=None, metavar="OUT_DIR",
                   help="where to write evaluation.csv, lesions.csv and summary.json (default: PRED_DIR)")
    p.add_argument("--tolerance-mm", type=_tolerance, default=1.0,
                   help="surface Dice tolerance in mm (default 1.0)")
    p.add_argument("-np", "--num-workers", type=_positive_int, default=DEFAULT_WORKERS,
                   help=f"worker processes, one case each in memory (default {DEFAULT_WORKERS})")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Run ``autoseg evaluate``; returns the exit status."""
    ref, pred = Path(args.ref), Path(args.pred)
    labels, ending = resolve_labels(args.dataset, args.labels, [pred, ref.parent])
    per_case, summary, lesions = evaluate_folders(
        ref, pred, labels, ending, args.num_workers, args.tolerance_mm, return_lesions=True
    )
    out = Path(args.output) if args.output else pred
    write_csv(out / "evaluation.csv", per_case)
    write_csv(out / "lesions.csv", lesions)
    write_json(out / "summary.json", json_safe(summary))
    print(format_summary(summary))
    if summary["unmatched_predictions"]:
        print(f"\nignored {len(summary['unmatched_predictions'])} prediction(s) without a reference: "
              f"{', '.join(summary['unmatched_predictions'])}")
    print(f"\nwrote {out / 'evaluation.csv'}, {out / 'lesions.csv'}, {out / 'summary.json'}")
    return 0
