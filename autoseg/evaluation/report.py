"""Clinical-style report of predicted label maps: organ and tumour volumes, lesions, tumour burden, overlays.

Measurements (pure functions, no I/O)
-------------------------------------
* Volumes: voxel count x voxel volume, in mL (1 mL = 1000 mm^3), per label.
* Lesions: the 26-connected components of each tumour label (a label named ``X_tumor``/``X_tumour``/``X_lesion``;
  its organ is label ``X`` when it exists), ranked by volume (lesion 1 = largest).
* Maximal axial diameter: the largest in-plane Feret (caliper) diameter over the lesion's axial slices, in mm.
  "Axial" is the array's slice axis (z, ITK index axis 2), the patient's craniocaudal axis for axial CT. On each
  slice the boundary points are the midpoints of the pixel edges between the lesion and the background (where
  marching squares would put the contour), so the lesion is measured edge to edge like an on-screen caliper and a
  single pixel measures one pixel width; like marching squares, the contour cuts each convex corner by half a
  pixel. The diameter is the largest distance between the convex-hull vertices of
  those points, with the in-plane spacing applied (direction cosines are orthonormal, so index-space distances
  scaled by spacing are physical distances).
* Intensity statistics (with the CT image, as TotalSegmentator's ``--statistics``): mean, median and the 5th and
  95th percentiles of the image (HU) over each structure's voxels and each lesion's, linear-interpolated
  percentiles as numpy's default; NaN for an empty structure.
* Centroid: mean voxel index, mapped to ITK/LPS physical coordinates (mm) with the image geometry,
  ``origin + D @ (spacing * index_xyz)``, as ``TransformContinuousIndexToPhysicalPoint`` does.
* Tumour burden of an organ: tumour volume / (organ volume + tumour volume), where the organ label excludes its
  tumour, i.e. the tumour's share of the whole organ (0-1). ``liver_tumour_burden`` is the liver's. NaN when the
  organ and tumour are both absent.

Outputs of ``autoseg report`` (in ``-o``): ``report.csv`` (one row per case), ``report_lesions.csv`` (one row per
lesion), ``report.json`` (everything, NaN as null), ``overlays/CASE.png`` (axial slices through the largest lesions,
labels over the CT in an abdominal window W400/L40, or over black without ``-images``; shown in radiological
convention when the direction is axis-aligned: patient right on the image left, anterior up) and ``report.html``, a
single self-contained file with the overlays embedded (base64 data URIs), to send on as it is.

With the output of ``predict --uncertainty`` (``PRED_DIR/uncertainty/``) each case also gets its expected Dice per
structure and review flag (flagged cases first, at the top of ``report.html``), each lesion its mean probability,
entropy and confidence, and the overlay a second row with the predictive entropy under the labels.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from ..atomic import json_safe, write_csv, write_json
from ..errors import AutosegError
from ..io.dataset import case_files, find_image
from ..io.images import Geometry, read_image
from ..inference.uncertainty import lesion_confidence
from ..jsonfile import read_json
from ..labels import DEFAULT_LABELS, LabelSpec, check_labels
from ..layout import UNCERTAINTY, UNCERTAINTY_MAPS, uncertainty_files
from ..masks import connected_components, label_boxes
from ..parallel import map_cases
from .evaluate import geometry_mismatch
from .metrics import as_labels
from .rendering import render_montage, write_html

# ----------------------------------------------------------------------------------------------------------------
# Measurements


def _edge_midpoints(mask2d: np.ndarray) -> np.ndarray:
    """(N, 2) (row, col) index coordinates of the midpoints of the pixel edges between mask and background."""
    mp = np.pad(mask2d, 1)
    rows, cols = np.nonzero(mp[1:, 1:-1] != mp[:-1, 1:-1])  # horizontal edges: between rows r-1 and r
    a = np.column_stack([rows - 0.5, cols])
    rows, cols = np.nonzero(mp[1:-1, 1:] != mp[1:-1, :-1])  # vertical edges: between cols c-1 and c
    b = np.column_stack([rows, cols - 0.5])
    return np.concatenate([a, b]).astype(np.float64)


def _farthest_pair(points_mm: np.ndarray) -> tuple[float, int, int]:
    """Largest distance in a point set and the indices of its two ends (convex hull first when large)."""
    idx = np.arange(len(points_mm))
    if len(points_mm) > 16:
        from scipy.spatial import ConvexHull, QhullError

        try:
            idx = ConvexHull(points_mm).vertices
        except QhullError:  # all points collinear: every pair is still checked below
            pass
    p = points_mm[idx]
    d2 = ((p[:, None, :] - p[None, :, :]) ** 2).sum(-1)
    i, j = np.unravel_index(int(np.argmax(d2)), d2.shape)
    return float(math.sqrt(d2[i, j])), int(idx[i]), int(idx[j])


def max_axial_diameter(mask: np.ndarray, spacing_zyx: Sequence[float]) -> tuple[float, int, np.ndarray]:
    """Largest in-plane (axial) Feret diameter of a 3D mask over its slices, edge to edge, in mm.

    Parameters
    ----------
    mask : ndarray of bool, (Z, Y, X)
    spacing_zyx : sequence of float
        Voxel size in mm; only the in-plane (y, x) spacing matters.

    Returns
    -------
    diameter_mm : float
        0.0 for an empty mask.
    slice_index : int
        The z index where the diameter was found (-1 when empty).
    endpoints : ndarray, (2, 2)
        The diameter's two ends as (row, col) = (y, x) index coordinates on that slice.

    Examples
    --------
    A 3 x 8 pixel rectangle of 0.5 mm pixels (1.5 x 4 mm). The contour through the pixel-edge midpoints cuts each
    corner by half a pixel (as marching squares does), so the longest chord runs from the middle of the top row's
    left edge to the middle of the bottom row's right edge: 2 rows x 0.5 mm down, 8 columns x 0.5 mm across.

    >>> m = np.zeros((1, 5, 10), bool); m[0, 1:4, 1:9] = True
    >>> d, z, ends = max_axial_diameter(m, (1.0, 0.5, 0.5))
    >>> round(d, 4) == round(math.hypot(1.0, 4.0), 4), z, ends.tolist()
    (True, 0, [[1.0, 0.5], [3.0, 8.5]])
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D (Z, Y, X), got {mask.ndim}D")
    sy, sx = float(spacing_zyx[1]), float(spacing_zyx[2])
    best, best_z, best_ends = 0.0, -1, np.zeros((2, 2))
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        pts = _edge_midpoints(mask[z])
        d, i, j = _farthest_pair(pts * (sy, sx))
        if d > best:
            best, best_z, best_ends = d, int(z), pts[sorted((i, j), key=lambda k: tuple(pts[k]))]
    return best, best_z, best_ends


def index_to_world(index_zyx: Sequence[float], geometry: Geometry) -> tuple[float, float, float]:
    """Continuous array index (z, y, x) to ITK physical (LPS) coordinates (x, y, z) in mm.

    >>> g = Geometry(spacing=(2.0, 1.0, 3.0), origin=(10.0, 0.0, -5.0), direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1),
    ...              shape=(4, 4, 4))
    >>> index_to_world((1.0, 2.0, 3.0), g)
    (4.0, 2.0, -2.0)
    """
    d = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    ijk = np.asarray(index_zyx, dtype=np.float64)[::-1] * np.asarray(geometry.spacing, dtype=np.float64)
    p = np.asarray(geometry.origin, dtype=np.float64) + d @ ijk
    return tuple(float(v) for v in p)


HU_STATISTICS = ("hu_mean", "hu_median", "hu_p5", "hu_p95")
LESION_CONFIDENCE = ("mean_probability", "mean_entropy", "mean_mutual_information", "confidence")


def intensity_statistics(values: np.ndarray) -> dict[str, float]:
    """Mean, median, 5th and 95th percentile of the image values of one structure (NaN when it is empty).

    >>> intensity_statistics(np.arange(101.0))
    {'hu_mean': 50.0, 'hu_median': 50.0, 'hu_p5': 5.0, 'hu_p95': 95.0}
    """
    if values.size == 0:
        return {k: math.nan for k in HU_STATISTICS}
    v = np.asarray(values, dtype=np.float64)
    p5, p50, p95 = np.percentile(v, [5, 50, 95])
    return {"hu_mean": float(v.mean()), "hu_median": float(p50), "hu_p5": float(p5), "hu_p95": float(p95)}


def lesion_measurements(
    labels: np.ndarray, geometry: Geometry, label_map: Mapping[str, Any] | None = None,
    image: np.ndarray | None = None, uncertainty: Mapping[str, np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """Every tumour lesion of a label map: volume, maximal axial diameter and centroid.

    Parameters
    ----------
    labels : ndarray of int, (Z, Y, X)
    geometry : Geometry
        The label map's geometry (spacing, origin, direction in ITK x, y, z order).
    label_map : dict, optional
        ``dataset.json`` labels (default :data:`DEFAULT_LABELS`); tumour labels are those named ``X_tumor``.
    image : ndarray, (Z, Y, X), optional
        The CT on the same grid; adds :func:`intensity_statistics` (``hu_mean``, ...) per lesion.
    uncertainty : dict of ndarray, optional
        ``predict --uncertainty``'s maps on the same grid (``probability``, ``entropy``, optionally
        ``mutual_information``); adds :func:`~autoseg.inference.uncertainty.lesion_confidence` per lesion
        (``mean_probability``, ``mean_entropy``, ``mean_mutual_information``, ``confidence``).

    Returns
    -------
    list of dict
        Per lesion, tumour labels in value order and lesions by decreasing volume: ``structure``, ``organ``,
        ``lesion`` (1 = largest), ``voxels``, ``volume_ml``, ``equivalent_diameter_mm``,
        ``max_axial_diameter_mm``, ``axial_slice``, ``diameter_endpoints_index`` (two (z, y, x)),
        ``centroid_index`` (z, y, x) and ``centroid_world_mm`` (x, y, z, ITK/LPS).

    Examples
    --------
    >>> lab = np.zeros((3, 6, 6), np.uint8); lab[1, 1:3, 1:5] = 2
    >>> g = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), lab.shape)
    >>> les = lesion_measurements(lab, g)
    >>> les[0]["structure"], les[0]["volume_ml"], round(les[0]["max_axial_diameter_mm"], 3), les[0]["centroid_world_mm"]
    ('liver_tumor', 0.008, 4.123, [2.5, 1.5, 1.0])
    """
    labels = as_labels(labels, "labels")
    if labels.ndim != 3 or tuple(labels.shape) != tuple(geometry.shape):
        raise ValueError(f"labels shape {labels.shape} must be 3D and match the geometry's {tuple(geometry.shape)}")
    label_map = DEFAULT_LABELS if label_map is None else label_map
    spacing = geometry.spacing_zyx
    voxel_mm3 = float(np.prod(spacing))
    tumours = LabelSpec.from_labels(label_map).tumour_organs()
    out: list[dict[str, Any]] = []
    max_value = max(tumours, default=0)
    boxes = label_boxes(labels, max_value)
    for value, (name, organ, _) in sorted(tumours.items()):
        box = boxes[value - 1]
        if box is None:
            continue
        start = np.array([s.start for s in box], dtype=np.float64)
        cc, n = connected_components(labels[box] == value)
        sizes = np.bincount(cc.ravel(), minlength=n + 1)[1:]
        centroids = np.asarray(ndimage.center_of_mass(cc > 0, cc, np.arange(1, n + 1)), dtype=np.float64)
        comp_boxes = ndimage.find_objects(cc)
        for rank, k in enumerate(np.argsort(-sizes, kind="stable"), start=1):
            cbox = comp_boxes[k]
            d, z, ends = max_axial_diameter(cc[cbox] == k + 1, spacing)
            offset = start + [s.start for s in cbox]
            centroid = centroids[k].reshape(3) + start
            ends_zyx = [[float(offset[0] + z), float(offset[1] + e[0]), float(offset[2] + e[1])] for e in ends]
            volume = float(sizes[k] * voxel_mm3)
            out.append({
                "structure": name,
                "organ": organ,
                "lesion": rank,
                "voxels": int(sizes[k]),
                "volume_ml": volume / 1000.0,
                "equivalent_diameter_mm": float(np.cbrt(6.0 * volume / np.pi)),
                "max_axial_diameter_mm": d,
                "axial_slice": int(offset[0] + z),
                "diameter_endpoints_index": ends_zyx,
                "centroid_index": [round(float(c), 3) for c in centroid],
                "centroid_world_mm": [round(c, 3) for c in index_to_world(centroid, geometry)],
            })
            region = tuple(slice(a.start + o.start, a.start + o.stop) for a, o in zip(box, cbox))
            if image is not None:
                out[-1].update(intensity_statistics(image[region][cc[cbox] == k + 1]))
            if uncertainty is not None:
                inside = cc[cbox] == k + 1
                mi = uncertainty.get("mutual_information")
                out[-1].update(lesion_confidence(uncertainty["probability"][region][inside],
                                                 uncertainty["entropy"][region][inside],
                                                 None if mi is None else mi[region][inside]))
    return out


def case_report(
    labels: np.ndarray, geometry: Geometry, label_map: Mapping[str, Any] | None = None, case_id: str = "",
    image: np.ndarray | None = None, uncertainty: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Volumes, tumour counts and burden, and lesion measurements of one predicted label map; with the CT
    ``image`` (same grid) also ``intensity_hu``: :func:`intensity_statistics` per single-value label, and per lesion;
    with ``uncertainty`` maps each lesion's confidence (:func:`lesion_measurements`).

    Returns
    -------
    dict
        ``case``, ``volumes_ml`` (per single-value label except background), ``tumour_count``,
        ``tumour_volume_ml`` and ``tumour_burden`` (per organ, see the module docstring), ``liver_tumour_burden``
        (NaN without a liver/liver-tumour pair) and ``lesions`` (:func:`lesion_measurements`).

    Examples
    --------
    >>> lab = np.zeros((2, 4, 4), np.uint8); lab[0] = 1; lab[0, 0, :2] = 2
    >>> g = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), lab.shape)
    >>> r = case_report(lab, g, case_id="c1")
    >>> r["volumes_ml"]["liver"], r["tumour_count"], r["liver_tumour_burden"]
    (0.014, {'liver': 1, 'kidney': 0}, 0.125)
    """
    labels = as_labels(labels, "labels")
    label_map = DEFAULT_LABELS if label_map is None else label_map
    checked = check_labels(label_map)
    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
    named = {n: v for n, v in checked.items() if isinstance(v, int) and v != 0}
    counts = np.bincount(labels.ravel(), minlength=max(named.values(), default=0) + 1)
    volumes = {n: float(counts[v] * voxel_ml) for n, v in named.items()}
    lesions = lesion_measurements(labels, geometry, label_map, image, uncertainty)
    tumour_count: dict[str, int] = {}
    tumour_volume: dict[str, float] = {}
    burden: dict[str, float] = {}
    for value, (name, organ, organ_value) in sorted(LabelSpec.from_labels(label_map).tumour_organs().items()):
        tumour_count[organ] = tumour_count.get(organ, 0) + sum(les["structure"] == name for les in lesions)
        tumour_volume[organ] = tumour_volume.get(organ, 0.0) + volumes[name]
        whole = tumour_volume[organ] + (volumes[organ] if organ_value else 0.0)
        burden[organ] = tumour_volume[organ] / whole if whole > 0 else math.nan
    intensity = {}
    if image is not None:
        if tuple(np.shape(image)) != tuple(labels.shape):
            raise ValueError(f"image shape {np.shape(image)} differs from the labels' {labels.shape}")
        intensity = {n: intensity_statistics(np.asarray(image)[labels == v]) for n, v in named.items()}
    return {
        "case": case_id,
        "volumes_ml": volumes,
        "intensity_hu": intensity,
        "tumour_count": tumour_count,
        "tumour_volume_ml": tumour_volume,
        "tumour_burden": burden,
        "liver_tumour_burden": burden.get("liver", math.nan),
        "lesions": lesions,
    }


# ----------------------------------------------------------------------------------------------------------------
# Tables and HTML


def _csv_row(rep: Mapping[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"case": rep["case"]}
    row.update({f"{n}_ml": v for n, v in rep["volumes_ml"].items()})
    row.update({f"n_{organ}_tumours": n for organ, n in rep["tumour_count"].items()})
    row.update({f"{organ}_tumour_burden": b for organ, b in rep["tumour_burden"].items()})
    row.update({f"{n}_{k}": v for n, stats in rep["intensity_hu"].items() for k, v in stats.items()})
    row["largest_axial_diameter_mm"] = max((les["max_axial_diameter_mm"] for les in rep["lesions"]), default=0.0)
    review = rep.get("review")
    if review:
        row["flag_for_review"] = review["flag_for_review"]
        row["review_reasons"] = "; ".join(review["reasons"])
        names = review["structures"]
        row.update({f"{names.get(k, k)}_expected_dice": q for k, q in review["expected_dice"].items()})
    return row


def _lesion_rows(rep: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for les in rep["lesions"]:
        row = {"case": rep["case"], **les}
        for key in ("centroid_index", "centroid_world_mm"):
            row[key] = " ".join(f"{v:g}" for v in les[key])
        row.pop("diameter_endpoints_index")
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Folders


@dataclass(frozen=True)
class _ReportTask:
    case: str
    pred: str
    image: str | None
    png: str
    label_map: tuple[tuple[str, Any], ...]
    uncertainty: str | None = None  # the folder of predict --uncertainty when it holds this case
    ending: str = ".nii.gz"

    def __str__(self) -> str:
        return f"case {self.case}"


def _report_task(task: _ReportTask) -> dict[str, Any]:
    labels, geometry = read_image(task.pred)
    image = None
    if task.image is not None:
        image, image_geo = read_image(task.image)
        problem = geometry_mismatch(Path(task.pred), geometry, Path(task.image), image_geo)
        if problem:
            raise AutosegError(problem.replace("reference", "image") + "; the prediction must lie on its image's grid")
    label_map = dict(task.label_map)
    maps, review = _read_uncertainty(Path(task.uncertainty), task.case, task.ending, Path(task.pred), geometry) \
        if task.uncertainty else (None, None)
    try:
        rep = case_report(labels, geometry, label_map, task.case, image, maps)
    except ValueError as e:
        raise AutosegError(f"{task.pred}: {e}") from None
    if review is not None:
        rep["review"] = review
    render_montage(task.png, labels, geometry, rep["lesions"], image, label_map, title=task.case,
                   uncertainty=None if maps is None else maps["entropy"])
    return rep


def _read_uncertainty(folder: Path, case: str, ending: str, pred: Path,
                      geometry: Geometry) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The maps (on the label map's grid, checked) and the review part of one case's ``predict --uncertainty``
    summary."""
    files = uncertainty_files(case, ending)
    summary = read_json(folder / files["summary"], "predict the case again with --uncertainty --overwrite",
                        "uncertainty")
    maps = {}
    for name in UNCERTAINTY_MAPS:
        path = folder / files[name]
        if name == "mutual_information" and name not in summary["maps"]:
            continue
        arr, geo = read_image(path)
        problem = geometry_mismatch(pred, geometry, path, geo)
        if problem:
            raise AutosegError(problem.replace("reference", "uncertainty map") + "; predict the case again with "
                               "--uncertainty --overwrite")
        maps[name] = arr
    review = {k: summary[k] for k in ("flag_for_review", "reasons", "expected_dice", "structures", "members")}
    return maps, review


def report_folder(
    pred_dir: str | Path,
    out_dir: str | Path,
    label_map: Mapping[str, Any],
    file_ending: str = ".nii.gz",
    image_dir: str | Path | None = None,
    num_workers: int = 1,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Report every ``PRED_DIR/CASE<file_ending>``: writes ``report.csv``, ``report_lesions.csv``, ``report.json``,
    ``overlays/CASE.png`` and ``report.html`` in ``out_dir``; returns the per-case reports. Missing images (when
    ``image_dir`` is given) and unreadable cases are raised together as one :class:`AutosegError`."""
    import pandas as pd

    pred_dir, out_dir = Path(pred_dir), Path(out_dir)
    if not pred_dir.is_dir():
        raise AutosegError(f"{pred_dir}: prediction folder not found")
    checked = check_labels(label_map)
    cases = case_files(pred_dir, file_ending)
    if not cases:
        raise AutosegError(f"{pred_dir}: holds no label map CASE{file_ending}; is the file ending right?")
    images: dict[str, Path | None] = {c: None for c in cases}
    if image_dir is not None:
        image_dir = Path(image_dir)
        if not image_dir.is_dir():
            raise AutosegError(f"{image_dir}: image folder not found")
        images = {c: find_image(image_dir, c, file_ending) for c in cases}
        missing = [c for c, p in images.items() if p is None]
        if missing:
            raise AutosegError(
                f"{len(missing)} case(s) have no image in {image_dir}: {', '.join(missing)} (expected "
                f"CASE_0000{file_ending} or CASE{file_ending}); add them or leave out -images"
            )
    folder = pred_dir / UNCERTAINTY
    tasks = [
        _ReportTask(c, str(p), None if images[c] is None else str(images[c]), str(out_dir / "overlays" / f"{c}.png"),
                    tuple((n, list(v) if isinstance(v, tuple) else v) for n, v in checked.items()),
                    str(folder) if (folder / uncertainty_files(c, file_ending)["summary"]).is_file() else None,
                    file_ending)
        for c, p in cases.items()
    ]
    outcomes = map_cases(_report_task, tasks, num_workers, desc="report", progress=progress)
    errors = [err for _, err in outcomes if err is not None]
    if errors:
        raise AutosegError(f"{len(errors)} case(s) could not be reported:\n" + "\n".join(f"  - {e}" for e in errors))
    reports = [rep for rep, _ in outcomes]
    write_csv(out_dir / "report.csv", pd.DataFrame([_csv_row(r) for r in reports]))
    lesion_columns = ["case", "structure", "organ", "lesion", "voxels", "volume_ml", "equivalent_diameter_mm",
                      "max_axial_diameter_mm", "axial_slice", "centroid_index", "centroid_world_mm",
                      *(HU_STATISTICS if image_dir is not None else ()),
                      *(LESION_CONFIDENCE if any(t.uncertainty for t in tasks) else ())]
    write_csv(out_dir / "report_lesions.csv",
              pd.DataFrame([row for r in reports for row in _lesion_rows(r)], columns=lesion_columns))
    write_json(out_dir / "report.json", json_safe({
        "cases": reports, "labels": dict(label_map),
        "definitions": {
            "volumes_ml": "voxel count x voxel volume",
            "tumour_burden": "tumour volume / (organ volume + tumour volume); the organ label excludes its tumour",
            "max_axial_diameter_mm": "largest in-plane Feret diameter over the lesion's axial slices, measured "
            "between pixel-edge midpoints (edge to edge)",
            "centroid_world_mm": "mean voxel index mapped to ITK/LPS physical coordinates (x, y, z)",
            "lesion": "26-connected component of a tumour label, 1 = largest",
            "intensity_hu": "mean, median, 5th and 95th percentile of the CT (HU) over the structure's voxels "
            "(with -images; per lesion too)",
            "review": "predict --uncertainty: expected Dice per structure and flag_for_review by the thresholds "
            "calibrated on cross-validation, with the reasons",
            "confidence": "per lesion: mean probability of its label x (1 - mean normalised predictive entropy), 0-1",
        },
    }))
    write_html(out_dir / "report.html", reports,
               {c: "data:image/png;base64," + base64.b64encode(Path(t.png).read_bytes()).decode("ascii")
                for c, t in zip(cases, tasks)})
    return reports
