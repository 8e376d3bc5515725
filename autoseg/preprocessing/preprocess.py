"""Preprocessing (crop to non-zero, normalise, resample to the plan's spacing) and its exact inverse.

A preprocessed case is four files in ``<preprocessed>/<dataset>/<data_identifier>/`` (axis order C, Z, Y, X):
``<case>.npy`` float32 image (memory-mappable), ``<case>_seg.npy`` uint8 labels, ``<case>_fg.npz`` up to
``FG_SAMPLES`` voxel coordinates per label with their connected component (lesion-aware sampling), and ``<case>.json`` with the original
geometry, crop box and spacings. The JSON is written last, so its presence marks a finished case; every file is
written to a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from ..atomic import remove_stale_temporaries, write_json, write_npy, write_npz
from ..io.dataset import Case, case_signature, read_case
from ..io.images import Geometry
from ..jsonfile import read_json
from ..layout import preprocessed_files
from ..masks import connected_components
from ..memory import require_memory
from ..errors import AutosegError, DatasetError
from ..planning.fingerprint import nonzero_bbox
from ..parallel import CaseMapper, map_cases
from .resample import case_memory_bytes, resample_array, resample_labels

FG_SAMPLES = 10_000
MIN_PER_COMPONENT = 64
# Bumped when what a preprocessed case holds changes, so older preprocessed data is redone instead of misread.
CASE_FORMAT = 2  # 2: foreground coordinates carry their connected component


def axis_orders(case_spacing: Sequence[float], target_spacing: Sequence[float], order: int, rules: dict) -> list[int]:
    """Interpolation order per axis: ``order`` everywhere except the out-of-plane axis of anisotropic data.

    The out-of-plane axis is the coarsest axis of the case (if the case is anisotropic) or else of the target
    spacing (if that is); there, interpolating across thick slices smears structures, so it gets
    ``out_of_plane_order`` (nearest by default).
    """
    orders = [order] * len(case_spacing)
    for sp in (case_spacing, target_spacing):
        if max(sp) / min(sp) > rules["anisotropy_threshold"]:
            orders[int(np.argmax(sp))] = min(order, rules["out_of_plane_order"])
            break
    return orders


def normalize(data: np.ndarray, scheme: list[dict[str, Any]]) -> np.ndarray:
    """Normalise each channel in place according to the plan's entries (CT clip + global z-score, or per-image)."""
    for entry in scheme:
        ch = data[entry["channel"]]
        if entry["scheme"] == "ct":
            np.clip(ch, entry["clip"][0], entry["clip"][1], out=ch)
            ch -= entry["mean"]
            ch /= max(entry["std"], 1e-8)
        else:
            mean, std = float(ch.mean(dtype=np.float64)), float(ch.std(dtype=np.float64))
            ch -= mean
            ch /= max(std, 1e-8)
    return data


def target_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> list[int]:
    """Voxel counts after resampling ``shape`` from ``spacing`` to ``target`` (at least one voxel per axis)."""
    return [max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target)]


def preprocess_case(
    data: np.ndarray,
    seg: np.ndarray | None,
    geometry: Geometry,
    config: dict[str, Any],
    normalization: list[dict[str, Any]],
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Crop, normalise and resample one case (pure). Returns image (C,Z,Y,X) float32, labels or None, properties."""
    if not np.isfinite(data).all():
        raise ValueError("image holds NaN or Inf values")
    box = nonzero_bbox(data)
    sl = tuple(slice(a, b) for a, b in box)
    # np.array copies: normalisation works in place, and the caller's image must stay as it was (a cascade
    # preprocesses the same image for both stages)
    data = normalize(np.array(data[(slice(None),) + sl], dtype=np.float32), normalization)
    spacing = geometry.spacing_zyx
    new_shape = target_shape(data.shape[1:], spacing, config["spacing"])
    require_memory(case_memory_bytes(data.shape[1:], new_shape, data.shape[0]),
                   f"resampling {tuple(data.shape[1:])} voxels of spacing {tuple(spacing)} mm to {tuple(new_shape)}",
                   "check the spacing in the image header (a wrong spacing makes a huge volume) or use a machine with "
                   "more memory")
    rules = config["resampling"]
    img_orders = axis_orders(spacing, config["spacing"], rules["image_order"], rules)
    lab_orders = axis_orders(spacing, config["spacing"], rules["label_order"], rules)
    data = resample_array(data, new_shape, img_orders)
    props: dict[str, Any] = {
        "geometry": geometry.to_json(),
        "crop_box": box,
        "shape_after_crop": [b - a for a, b in box],
        "spacing_original": list(spacing),
        "spacing": list(config["spacing"]),
        "shape_after_resample": new_shape,
        "label_orders": lab_orders,
    }
    if seg is not None:
        seg = resample_labels(np.ascontiguousarray(seg[sl]), new_shape, lab_orders)
        values, counts = np.unique(seg, return_counts=True)
        props["class_voxels"] = {str(int(v)): int(n) for v, n in zip(values, counts)}
    return data, seg, props


def restore_labels(seg: np.ndarray, props: dict[str, Any]) -> tuple[np.ndarray, Geometry]:
    """Inverse of ``preprocess_case`` for a label map: resample back, uncrop, return with the original geometry."""
    geometry = Geometry.from_json(props["geometry"])
    cropped = resample_labels(seg, props["shape_after_crop"], props["label_orders"])
    out = np.zeros(geometry.shape, dtype=seg.dtype)
    out[tuple(slice(a, b) for a, b in props["crop_box"])] = cropped
    return out, geometry


def restore_probabilities(
    probs: np.ndarray, props: dict[str, Any], background_channel: bool = True
) -> tuple[np.ndarray, Geometry]:
    """Inverse for (C, Z, Y, X) probabilities: resampling back, uncrop. Outside the crop box every channel is 0,
    except channel 0 when it is the softmax background (then 1)."""
    geometry = Geometry.from_json(props["geometry"])
    cropped = resample_array(probs, props["shape_after_crop"], props["label_orders"])
    out = np.zeros((probs.shape[0],) + tuple(geometry.shape), dtype=np.float32)
    if background_channel:
        out[0] = 1.0
    out[(slice(None),) + tuple(slice(a, b) for a, b in props["crop_box"])] = cropped
    return out, geometry


def foreground_locations(seg: np.ndarray, case_id: str, max_per_class: int = FG_SAMPLES) -> dict[str, np.ndarray]:
    """A seeded sample of (z, y, x) coordinates per non-zero label (``class_<v>``, uint16 (K, 3)) and the connected
    component each belongs to (``component_<v>``, uint32 (K,), 1-based), for lesion-aware sampling.

    The ``max_per_class`` budget is shared equally among a label's components, each keeping at least
    ``MIN_PER_COMPONENT`` voxels (all of a smaller one), so a 30-voxel lesion next to a large one is never sampled
    away.
    """
    rng = np.random.default_rng(zlib.crc32(case_id.encode()))
    out = {}
    for v, box in enumerate(ndimage.find_objects(seg), start=1):
        if box is None:
            continue
        comps, n = connected_components(seg[box] == v)
        flat = comps.reshape(-1)
        idx = np.flatnonzero(flat)
        ids = flat[idx]
        order = np.argsort(ids, kind="stable")
        idx, ids = idx[order], ids[order]
        sizes = np.bincount(ids, minlength=n + 1)[1:]
        quota = max(min(MIN_PER_COMPONENT, max_per_class), max_per_class // n)
        keep = []
        for start, size in zip(np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes):
            rows = np.arange(start, start + size)
            keep.append(rows if size <= quota else np.sort(rng.choice(rows, quota, replace=False)))
        rows = np.concatenate(keep)
        local = np.stack(np.unravel_index(idx[rows], comps.shape), axis=1)
        out[f"class_{v}"] = (local + [b.start for b in box]).astype(np.uint16)
        out[f"component_{v}"] = ids[rows].astype(np.uint32)
    return out


def config_hash(config: dict[str, Any], normalization: list[dict[str, Any]]) -> str:
    """Identifies the preprocessing a case was made with, so a changed plan reprocesses instead of reusing."""
    keys = {k: config[k] for k in ("spacing", "resampling")}
    return hashlib.sha256(json.dumps([keys, normalization, CASE_FORMAT], sort_keys=True).encode()).hexdigest()[:16]


def case_done(folder: Path, case: Case, digest: str) -> bool:
    """True when all four files of a case exist, were made with the current preprocessing and from the raw files
    as they are now (same size and mtime); an unreadable properties file means the case is redone."""
    files = preprocessed_files(case.case_id)
    meta = folder / files["props"]
    if not meta.is_file() or not all((folder / files[kind]).is_file() for kind in ("data", "fg")):
        return False
    try:
        props = read_json(meta, "it is regenerated", "case_properties")
    except AutosegError:
        return False
    return (props["preprocessing"] == digest and props.get("sources") == case_signature(case)
            and (not props["has_label"] or (folder / files["seg"]).is_file()))


def _case_job(job: tuple[Case, dict[str, Any], list[dict[str, Any]], str, str]) -> str:
    case, config, normalization, folder, digest = job
    sources = case_signature(case)  # before reading, so an edit during the run is seen by the next one
    data, seg, geometry = read_case(case)
    try:
        data, seg, props = preprocess_case(data, seg, geometry, config, normalization)
    except ValueError as e:
        raise AutosegError(f"case {case.case_id} ({case.images[0]}): {e}") from None
    folder = Path(folder)
    files = preprocessed_files(case.case_id)
    write_npy(folder / files["data"], data)
    if seg is not None:
        write_npy(folder / files["seg"], seg)
    write_npz(folder / files["fg"], foreground_locations(seg, case.case_id) if seg is not None else {})
    write_json(folder / files["props"], {"case": case.case_id, "preprocessing": digest, "has_label": seg is not None,
                                         "sources": sources, **props})
    return case.case_id


def preprocess_dataset(
    cases: list[Case],
    plans: dict[str, Any],
    configurations: Sequence[str],
    out_root: Path,
    num_workers: int = 1,
    progress: bool = True,
    cluster: CaseMapper | None = None,
) -> dict[str, int]:
    """Preprocess every case for each data identifier the configurations need (in ``num_workers`` processes, or
    on ``cluster`` when given); finished cases are skipped.

    Returns, per data identifier, how many cases were processed now. Bad cases do not stop the others; they are
    all reported together at the end (``DatasetError``).
    """
    done: dict[str, int] = {}
    errors: list[str] = []
    for name in configurations:
        config = plans["configurations"][name]
        ident = config["data_identifier"]
        if ident in done:
            continue
        folder = out_root / ident
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder)
        source = plans["configurations"].get(ident, config)  # 2d reuses the 3d_fullres data
        digest = config_hash(source, plans["normalization"])
        todo = [c for c in cases if not case_done(folder, c, digest)]
        jobs = [(c, source, plans["normalization"], str(folder), digest) for c in todo]
        results = map_cases(_case_job, jobs, num_workers, desc=f"preprocess {ident}", progress=progress,
                            cluster=cluster)
        errors += [err for _, err in results if err]
        done[ident] = sum(1 for r, _ in results if r)
    if errors:
        raise DatasetError(errors)
    return done
