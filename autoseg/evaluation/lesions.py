"""Lesion-level detection of tumours: connected lesions matched between prediction and reference, by size.

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

"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from ..masks import bounding_box, connected_components, join_boxes
from .metrics import check_pair

SIZE_BINS = ("<10mm", "10-20mm", ">20mm")
DETECTION_BINS = ("all",) + SIZE_BINS + (">=10mm",)
CRITERIA = ("iou", "any")
IOU_THRESHOLD = 0.5


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


def lesions_in_box(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], iou_threshold: float, offset: Sequence[int]
) -> dict[str, Any]:
    box = join_boxes([bounding_box(pred), bounding_box(ref)], pred.shape, margin=0)
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
    pred, ref, spacing = check_pair(pred, ref, spacing_zyx)
    return lesions_in_box(pred, ref, spacing, float(iou_threshold), [0] * pred.ndim)


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
