"""Evaluation of label maps: every label and region of a case, a dataset summary, and whole folders.

The metric conventions are in :mod:`autoseg.evaluation.metrics`, the lesion matching in
:mod:`autoseg.evaluation.lesions`.

Regions. A label given as a list in ``dataset.json`` is a region (union of its values). Without explicit regions,
every organ/tumour pair named ``X`` and ``X_tumor``/``X_tumour`` gets the region ``X_region`` = both values: for the
5-label abdomen set ``liver_region`` = [1, 2] and ``kidney_region`` = [3, 4] (the KiTS convention: the kidney
includes its tumour).

Dataset summary. Per label/region: mean and median Dice over cases, *global* Dice pooled over voxels
(``2 sum TP / (sum |P| + sum |R|)``), and the mean of every other metric ignoring NaN.

Output files of ``autoseg evaluate`` (in ``-o``, default the prediction folder)
------------------------------------------------------------------------------
* ``evaluation.csv``: long format, one row per (case, label or region) with every metric and the voxel counts.
* ``lesions.csv``: one row per lesion (``source`` = reference or predicted) with its size and match flags.
* ``summary.json``: the dataset summary; undefined values (NaN) are written as ``null``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import AutosegError
from ..io.dataset import case_files
from ..io.images import Geometry, read_header, read_image
from ..labels import LabelSpec, check_labels
from ..masks import join_boxes, label_boxes
from ..parallel import map_cases
from .kits import kits_metrics, kits_regions, summarize_kits
from .lesions import IOU_THRESHOLD, detection_stats, lesions_in_box
from .metrics import COUNT_KEYS, DISTANCE_KEYS, METRIC_KEYS, as_labels, binary_metrics, check_spacing


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
        Label values to match lesion by lesion; default the tumour labels of :class:`~autoseg.labels.LabelSpec`.
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
    pred_labels, ref_labels = as_labels(pred_labels, "pred_labels"), as_labels(ref_labels, "ref_labels")
    if pred_labels.shape != ref_labels.shape:
        raise ValueError(f"pred_labels and ref_labels differ in shape: {pred_labels.shape} vs {ref_labels.shape}")
    spacing = check_spacing(spacing_zyx, ref_labels.ndim)
    spec = LabelSpec.from_labels(labels)
    structures = spec.structures(regions)
    names = spec.names
    tumours = spec.tumour_values() if tumour_labels is None else [int(v) for v in tumour_labels]
    max_label = max([v for _, vs in structures.values() for v in vs] + tumours + [0])
    pred_boxes, ref_boxes = label_boxes(pred_labels, max_label), label_boxes(ref_labels, max_label)
    shape = ref_labels.shape

    def crop(values: Sequence[int]) -> tuple[np.ndarray, np.ndarray, tuple[slice, ...]]:
        box = join_boxes([b[v - 1] for b in (pred_boxes, ref_boxes) for v in values], shape, margin=0)
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
        result["lesions"][names.get(value, f"label_{value}")] = lesions_in_box(
            p, r, spacing, IOU_THRESHOLD, [b.start for b in box]
        )
    return result


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
    kits: tuple[tuple[str, tuple[int, ...]], ...] | None = None

    def __str__(self) -> str:  # map_cases names the item in a memory error
        return f"case {self.case}"


def geometry_mismatch(pred: Path, pred_geo: Geometry, ref: Path, ref_geo: Geometry) -> str | None:
    """Why ``pred`` does not lie on the grid of ``ref`` (the first differing field), None when it does."""
    for field, mine, theirs, _ in pred_geo.differences(ref_geo)[:1]:
        if field == "shape":
            return f"{pred}: shape {mine} (z, y, x) differs from reference {ref} {theirs}"
        return f"{pred}: {field} {mine} differs from reference {ref} {theirs}"
    return None


_GRID_FIX = "; predictions must lie on the reference grid (export them with the reference image's geometry)"


def _evaluate_task(task: _CaseTask) -> dict[str, Any]:
    ref, ref_geo = read_image(task.ref)
    pred, pred_geo = read_image(task.pred)
    problem = geometry_mismatch(Path(task.pred), pred_geo, Path(task.ref), ref_geo)
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
    if task.kits is not None:
        result["kits"] = kits_metrics(pred, ref, ref_geo.spacing_zyx, dict(task.kits))
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
    kits: bool = False,
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
        :func:`summarize`, plus ``cases`` and ``unmatched_predictions``; with ``kits``, also ``kits``: the KiTS
        challenges' Dice and area-weighted surface Dice per class (:mod:`autoseg.evaluation.kits`), per case and
        averaged.
    lesions : pandas.DataFrame
        Only when ``return_lesions``: one row per lesion.
    """
    ref_dir, pred_dir = Path(ref_dir), Path(pred_dir)
    for what, folder in (("reference", ref_dir), ("prediction", pred_dir)):
        if not folder.is_dir():
            raise AutosegError(f"{folder}: {what} folder not found")
    checked = check_labels(labels)
    LabelSpec(checked).structures(regions)  # fail early on bad labels/regions
    kits_classes = tuple((n, v) for n, v in kits_regions(checked).items()) if kits else None
    refs, preds = case_files(ref_dir, file_ending), case_files(pred_dir, file_ending)
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
            mismatch = geometry_mismatch(preds[case], read_header(preds[case]), refs[case], read_header(refs[case]))
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
            tolerance_mm=float(tolerance_mm), kits=kits_classes,
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
    if kits:
        summary["kits"] = {"classes": summarize_kits([r["kits"] for r in results]),
                           "per_case": {r["case"]: r["kits"] for r in results},
                           "definition": "KiTS21/23 official: Dice and area-weighted surface Dice (DeepMind "
                           "surface-distance, via MONAI) per hierarchical class at the challenges' tolerances"}
    return (per_case, summary, lesions) if return_lesions else (per_case, summary)


def _problem_text(problems: list[str]) -> str:
    return f"{len(problems)} problem(s) prevent the evaluation:\n" + "\n".join(f"  - {p}" for p in problems)


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
    if summary.get("kits"):
        lines += ["", f"{'KiTS class':<22} {'Dice':>6} {'surf.Dice':>9} {'tol. mm':>8}   (KiTS21/23 official)"]
        for name, k in summary["kits"]["classes"].items():
            lines.append(f"{name:<22} {_fmt(k['dice_mean']):>6} {_fmt(k['surface_dice_mean']):>9} "
                         f"{k['tolerance_mm']:>8.4f}")
    return "\n".join(lines)
