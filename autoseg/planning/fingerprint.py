"""Dataset fingerprint: the per-case geometry and intensity facts the planner decides from.

Per case: spacing, shape, shape after cropping to the non-zero region, voxels per label, and intensity statistics
of a seeded random sample of foreground voxels (label > 0) per channel. Dataset level: median and percentile
spacings and shapes, pooled foreground intensity statistics per channel, label voxel fractions.
Same data gives a byte-identical fingerprint: sampling is seeded by the case id, floats are rounded.
"""

from __future__ import annotations

import zlib
from typing import Any, Iterable

import numpy as np

from ..version import __version__
from ..io.dataset import Case, read_case
from ..labels import LabelSpec
from ..errors import AutosegError, DatasetError
from ..parallel import CaseMapper, map_cases
from ..schemas import validate

SCHEMA_VERSION = 1
SAMPLES_PER_CASE = 10_000


def _round(x: float, digits: int = 6) -> float:
    return float(f"{float(x):.{digits}g}")


def nonzero_bbox(data: np.ndarray) -> list[list[int]]:
    """Bounding box [[start, stop], ...] per spatial axis of voxels non-zero in any channel; full box if none."""
    mask = np.any(data != 0, axis=0)
    box = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        hit = np.flatnonzero(mask.any(axis=other))
        box.append([int(hit[0]), int(hit[-1]) + 1] if hit.size else [0, mask.shape[ax]])
    return box


def intensity_stats(values: np.ndarray) -> dict[str, float]:
    """Summary of a 1D intensity sample (float64 accumulation, float32 input)."""
    if values.size == 0:
        return {k: 0.0 for k in ("mean", "std", "min", "max", "median", "p00_5", "p99_5")}
    p = np.percentile(values, [0.5, 50.0, 99.5])
    return {
        "mean": _round(values.mean(dtype=np.float64)),
        "std": _round(values.std(dtype=np.float64)),
        "min": _round(values.min()),
        "max": _round(values.max()),
        "median": _round(p[1]),
        "p00_5": _round(p[0]),
        "p99_5": _round(p[2]),
    }


def case_fingerprint(
    case_id: str, data: np.ndarray, seg: np.ndarray, spacing_zyx: Iterable[float]
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Fingerprint of one case and its foreground intensity sample per channel (pure).

    The sample is drawn with replacement from voxels with label > 0, seeded by the case id.
    """
    box = nonzero_bbox(data)
    labels, counts = np.unique(seg, return_counts=True)
    fg = np.flatnonzero(seg.reshape(-1) > 0)
    rng = np.random.default_rng(zlib.crc32(case_id.encode()))
    pick = rng.choice(fg, SAMPLES_PER_CASE, replace=True) if fg.size else fg
    flat = data.reshape(data.shape[0], -1)
    samples = [flat[c, pick].astype(np.float32) for c in range(data.shape[0])]
    fp = {
        "case": case_id,
        "spacing": [_round(s) for s in spacing_zyx],
        "shape": [int(s) for s in seg.shape],
        "shape_after_crop": [b - a for a, b in box],
        "class_voxels": {str(int(v)): int(n) for v, n in zip(labels, counts)},
        "intensity": {str(c): intensity_stats(s) for c, s in enumerate(samples)},
    }
    return fp, samples


def _case_worker(case: Case) -> tuple[dict[str, Any], list[np.ndarray]]:
    data, seg, geometry = read_case(case)
    if seg is None:
        raise AutosegError(f"case {case.case_id}: no label file; the fingerprint needs labelsTr/{case.case_id}")
    return case_fingerprint(case.case_id, data, seg, geometry.spacing_zyx)


def summarize(
    dataset_name: str, meta: dict[str, Any], case_fps: list[dict[str, Any]], samples: list[list[np.ndarray]]
) -> dict[str, Any]:
    """Dataset-level fingerprint from per-case fingerprints and their intensity samples (pure)."""
    spacings = np.array([c["spacing"] for c in case_fps], dtype=np.float64)
    shapes = np.array([c["shape_after_crop"] for c in case_fps], dtype=np.float64)
    totals: dict[str, int] = {}
    for c in case_fps:
        for k, n in c["class_voxels"].items():
            totals[k] = totals.get(k, 0) + n
    n_vox = sum(totals.values())
    n_channels = len(meta["channel_names"])
    pooled = [np.concatenate([s[ch] for s in samples]) for ch in range(n_channels)]
    fp = {
        "schema_version": SCHEMA_VERSION,
        "autoseg_version": __version__,
        "dataset_name": dataset_name,
        "channel_names": dict(meta["channel_names"]),
        "labels": dict(meta["labels"]),
        "file_ending": meta["file_ending"],
        "num_cases": len(case_fps),
        "spacing_median": [_round(v) for v in np.percentile(spacings, 50, axis=0)],
        "spacing_p10": [_round(v) for v in np.percentile(spacings, 10, axis=0)],
        "spacing_p90": [_round(v) for v in np.percentile(spacings, 90, axis=0)],
        "shape_after_crop_median": [_round(v) for v in np.percentile(shapes, 50, axis=0)],
        "intensity": {str(ch): intensity_stats(pooled[ch]) for ch in range(n_channels)},
        "class_fractions": {k: _round(totals[k] / n_vox) for k in sorted(totals, key=int)},
        "cases": case_fps,
    }
    if "regions_class_order" in meta:
        fp["regions_class_order"] = list(meta["regions_class_order"])
    validate(fp, "fingerprint")
    return fp


def compute_fingerprint(
    dataset_name: str, meta: dict[str, Any], cases: list[Case], num_workers: int = 1, progress: bool = True,
    cluster: CaseMapper | None = None,
) -> dict[str, Any]:
    """Read every training case (in parallel when ``num_workers > 1``, on ``cluster`` when given) and build the
    fingerprint.

    Every unreadable case is reported together; a fingerprint of part of a dataset is never written.
    """
    if not cases:
        raise AutosegError(f"dataset {dataset_name}: no training cases found in imagesTr; add the training images as "
                           f"CASE_XXXX{meta['file_ending']} (or check AUTOSEG_RAW)")
    results = map_cases(_case_worker, cases, num_workers, desc="fingerprint", progress=progress, cluster=cluster)
    errors = [err for _, err in results if err]
    declared = set(LabelSpec.from_labels(meta["labels"]).values)  # without --verify, the only check before undeclared values reach training
    for case, (res, _) in zip(cases, results):
        undeclared = sorted(int(v) for v in (res[0]["class_voxels"] if res else {}) if int(v) not in declared)
        if undeclared:
            errors.append(f"{case.label}: label values {undeclared} are not declared in dataset.json 'labels' "
                          f"(declared: {sorted(declared)}); declare them in 'labels' or fix the label map")
    if errors:
        raise DatasetError(errors)
    return summarize(dataset_name, meta, [r[0] for r, _ in results], [r[1] for r, _ in results])
