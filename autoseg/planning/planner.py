"""The planner: a pure function from a dataset fingerprint to training plans (``plan(fingerprint) -> plans``).

Rules (each decision is also written, with its numbers, into the plans' ``notes``):

Target spacing
    The median spacing per axis. Anisotropy rule: when the coarsest median axis is more than
    ``ANISOTROPY`` (3) times the finest other axis *and* holds fewer than a third as many voxels, that axis takes the
    10th percentile of its spacings instead (never finer than the other axes): the median of a mixed thin- and
    thick-slice cohort would throw away the through-plane detail of every thin-slice scan, while the thick ones
    lose nothing by being interpolated to a finer grid.

Patch size, topology and batch size (``fit_configuration``)
    The patch starts with the aspect ratio of a physical cube (256**3 voxels in 3D, 2048**2 in 2D), clipped to the
    median image shape. Each axis is halved by a stride-2 stage while its feature map stays >= 4 voxels and its
    spacing is within 2x of the finest axis (so coarse axes are pooled only once the fine ones catch up); kernels
    are 1 along an axis that is still more than 2x coarser than the finest, else 3. Features double per stage
    from 32, capped at 320 (3D) or 512 (2D). Patch sides are multiples of the total stride per axis: rounded up,
    except on an axis clipped to the median image, which takes the nearest multiple (rounding a 130-voxel median
    up to 160 would spend a fifth of every patch on padding).
    While the estimated training memory at batch 2 exceeds the budget, the axis with the largest patch/median
    ratio shrinks by one stride multiple. Batch size then grows to fill the budget, but never past 5% of all
    dataset voxels per batch (so one batch does not see most of a small dataset).

Memory estimate (``estimate_memory_gb``), for mixed-precision training with deep supervision
    activations = batch * sum over stages of (voxels * features) * 14 tensors-per-stage-voxel-feature * 2 bytes
    (two conv-norm-nonlinearity blocks keep 3 tensors each in the encoder; the decoder adds the transposed conv,
    the concatenation and its own blocks) plus parameters * 16 bytes (fp32 weights, gradients, momentum, autocast
    copies) plus 1 GB for the CUDA context and workspaces. It is calibrated so an isotropic dataset gets the
    familiar 128**3 patch at batch 2 in 8 GB.

Low resolution
    ``3d_lowres`` exists when the full-resolution patch covers less than 25% of the median image: the spacing is
    coarsened 3% at a time (the finest axes first) until the patch covers at least that share. The cascade (below)
    needs it whatever the coverage: then, if the coverage rule did not create it, it takes twice the full-resolution
    spacing (an eighth of the voxels: the whole-volume organ pass is cheap, and still fine enough for boxes with a
    margin of several voxels).

Organ-ROI cascade (``3d_cascade``)
    When the labelled structures fill less than ``CASCADE_FOREGROUND`` (20%) of the cropped image (the summed
    ``class_fractions`` of every non-background label), most full-resolution tiles at prediction see only
    background. ``3d_cascade`` is then a copy of ``3d_fullres`` (same spacing, patch, network and preprocessed
    data) with ``previous_stage: 3d_lowres`` and ``roi_margin_mm`` (``CASCADE_MARGIN_MM``, 20 mm: a few voxels at
    low resolution, so a slightly short stage-1 organ still lies inside its box): stage 1 finds the organs on the
    whole volume at low resolution, stage 2 trains and predicts only inside boxes around them
    (:mod:`autoseg.inference.cascade`).

Normalisation
    A channel named CT (any case) is clipped to the foreground 0.5/99.5 percentiles and z-scored with the
    foreground mean and std (Hounsfield units are comparable across scans); any other channel is z-scored per image.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import numpy as np

from ..version import __version__
from ..schemas import validate

SCHEMA_VERSION = 1
ANISOTROPY = 3.0
MIN_FEATURE_MAP = 4
BASE_FEATURES = 32
MAX_FEATURES = {2: 512, 3: 320}
MAX_STAGES = {2: 7, 3: 6}
INITIAL_PATCH_VOXELS = {2: 2048**2, 3: 256**3}
# CPU plans are sized by compute, not memory (RAM is plentiful, FLOP/s are not): 8 base features and a patch of
# about 64**3 voxels keep one 3D training iteration near 1.5 s on 2 cores without AVX-512; 16 features cost 3x
# (see benchmarks/RESULTS.md).
CPU_BASE_FEATURES = 8
CPU_PATCH_VOXELS = {2: 192**2, 3: 64**3}
CPU_BATCH = {2: 8, 3: 2}
ACTIVATION_TENSORS = 14
BYTES_PER_ACTIVATION = 2
BYTES_PER_PARAMETER = 16
FIXED_OVERHEAD_GB = 1.0
MAX_BATCH_DATASET_FRACTION = 0.05
LOWRES_COVERAGE = 0.25
LOWRES_STEP = 1.03
CASCADE_FOREGROUND = 0.2
CASCADE_MARGIN_MM = 20.0
CASCADE_LOWRES_FACTOR = 2.0


def _r(x: float) -> float:
    return round(float(x), 6)


def fullres_spacing(spacings: np.ndarray, shapes: np.ndarray) -> tuple[list[float], str]:
    """Median spacing, with the anisotropy rule on the coarsest axis; returns the spacing and a note."""
    target = np.percentile(spacings, 50, axis=0)
    median_shape = np.percentile(shapes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != worst]
    aniso_spacing = target[worst] > ANISOTROPY * max(target[a] for a in others)
    aniso_voxels = median_shape[worst] * ANISOTROPY < min(median_shape[a] for a in others)
    if aniso_spacing and aniso_voxels:
        p10 = float(np.percentile(spacings[:, worst], 10))
        new = max(p10, max(target[a] for a in others) + 1e-5)
        note = (
            f"anisotropic data: median spacing {[_r(v) for v in target]} has axis {worst} over {ANISOTROPY:g}x the "
            f"others with under 1/{ANISOTROPY:g} of the voxels, so it takes its 10th percentile {_r(p10)} mm "
            f"(floored to the other axes) -> {_r(new)} mm instead of the median {_r(target[worst])} mm"
        )
        target[worst] = new
    else:
        note = f"target spacing = median spacing {[_r(v) for v in target]} mm (no anisotropy rule needed)"
    return [_r(v) for v in target], note


def topology(spacing: Sequence[float], patch: Sequence[int], base_features: int = BASE_FEATURES) -> dict[str, Any]:
    """Strides and kernels per stage for a patch at a spacing (see module docstring); sizes are not changed here."""
    dims = len(patch)
    cur_spacing = [float(s) for s in spacing]
    cur_size = [int(p) for p in patch]
    strides = [[1] * dims]
    kernels = []
    while True:
        finest = min(cur_spacing)
        kernels.append([3 if s <= 2 * finest else 1 for s in cur_spacing])
        if len(strides) == MAX_STAGES[dims]:
            break
        can = [cur_size[a] >= 2 * MIN_FEATURE_MAP for a in range(dims)]
        finest_poolable = min((cur_spacing[a] for a in range(dims) if can[a]), default=None)
        if finest_poolable is None:
            break
        stride = [2 if can[a] and cur_spacing[a] <= 2 * finest_poolable else 1 for a in range(dims)]
        strides.append(stride)
        cur_spacing = [s * k for s, k in zip(cur_spacing, stride)]
        cur_size = [s // k for s, k in zip(cur_size, stride)]
    total = [int(np.prod([s[a] for s in strides])) for a in range(dims)]
    features = [min(base_features * 2**i, MAX_FEATURES[dims]) for i in range(len(strides))]
    return {"strides": strides, "kernel_sizes": kernels, "features": features, "divisible_by": total}


def count_parameters(net: dict[str, Any], in_channels: int, num_classes: int) -> int:
    """Parameters of the planned U-Net (two convs per stage in encoder and decoder, transposed-conv upsampling)."""
    feats, kernels, strides = net["features"], net["kernel_sizes"], net["strides"]
    total, prev = 0, in_channels
    for f, k in zip(feats, kernels):
        kv = int(np.prod(k))
        total += prev * f * kv + f + f * f * kv + f + 4 * f  # two convs + two norms
        prev = f
    for s in range(len(feats) - 1, 0, -1):
        sv = int(np.prod(strides[s]))
        kv = int(np.prod(kernels[s - 1]))
        f_lo, f_hi = feats[s - 1], feats[s]
        total += f_hi * f_lo * sv + f_lo  # transposed conv
        total += 2 * f_lo * f_lo * kv + f_lo + f_lo * f_lo * kv + f_lo + 4 * f_lo
        total += f_lo * num_classes + num_classes  # deep-supervision / output head
    return int(total)


def estimate_memory_gb(patch: Sequence[int], batch: int, net: dict[str, Any], in_channels: int, num_classes: int) -> float:
    """Estimated training memory in GB (see module docstring for the formula and its calibration)."""
    size = np.array(patch, dtype=np.float64)
    act = 0.0
    for f, st in zip(net["features"], net["strides"]):
        size = size / np.array(st)
        act += float(np.prod(size)) * f
    act_bytes = batch * act * ACTIVATION_TENSORS * BYTES_PER_ACTIVATION
    param_bytes = count_parameters(net, in_channels, num_classes) * BYTES_PER_PARAMETER
    return (act_bytes + param_bytes) / 1e9 + FIXED_OVERHEAD_GB


def _round_up(x: float, m: int) -> int:
    return int(max(m, math.ceil(x / m) * m))


def fit_configuration(
    spacing: Sequence[float],
    median_shape: Sequence[float],
    dataset_voxels: float,
    budget_gb: float,
    in_channels: int,
    num_classes: int,
    device: str = "gpu",
) -> dict[str, Any]:
    """Patch, batch and network for one configuration at ``spacing`` (2 or 3 axes).

    ``device="gpu"``: fitted to ``budget_gb`` of accelerator memory. ``device="cpu"``: sized for compute (fewer
    features, a ~64**3 patch, a fixed small batch); the memory estimate is still reported.
    """
    dims = len(spacing)
    cpu = device == "cpu"
    base = CPU_BASE_FEATURES if cpu else BASE_FEATURES
    inv = 1.0 / np.array(spacing, dtype=np.float64)
    voxels = (CPU_PATCH_VOXELS if cpu else INITIAL_PATCH_VOXELS)[dims]
    patch_f = inv * (voxels / np.prod(inv)) ** (1.0 / dims)
    clipped = patch_f >= np.array(median_shape, dtype=np.float64)
    patch_f = np.minimum(patch_f, np.array(median_shape, dtype=np.float64))
    net = topology(spacing, [max(1, round(p)) for p in patch_f], base)
    # an axis clipped to the median image takes the nearest multiple: rounding up would mostly add padding
    patch = [
        max(d, int(round(p / d)) * d) if c else _round_up(p, d) for p, d, c in zip(patch_f, net["divisible_by"], clipped)
    ]
    net = topology(spacing, patch, base)  # the rounded patch may allow one more pooling step than the raw one
    patch = [_round_up(p, d) for p, d in zip(patch, net["divisible_by"])]
    shrinks = 0
    while not cpu and estimate_memory_gb(patch, 2, net, in_channels, num_classes) > budget_gb:
        ratios = [p / m for p, m in zip(patch, median_shape)]
        ax = int(np.argmax(ratios))
        if patch[ax] <= net["divisible_by"][ax]:
            candidates = [a for a in range(dims) if patch[a] > net["divisible_by"][a]]
            if not candidates:
                break
            ax = max(candidates, key=lambda a: ratios[a])
        patch[ax] -= net["divisible_by"][ax]
        shrinks += 1
        net = topology(spacing, patch, base)
        patch = [_round_up(p, d) for p, d in zip(patch, net["divisible_by"])]
    per_sample = estimate_memory_gb(patch, 1, net, in_channels, num_classes) - estimate_memory_gb(
        patch, 0, net, in_channels, num_classes
    )
    fixed = estimate_memory_gb(patch, 0, net, in_channels, num_classes)
    if cpu:
        batch_budget = CPU_BATCH[dims]
    else:
        batch_budget = max(2, int((budget_gb - fixed) / per_sample)) if per_sample > 0 else 2
    batch_cap = max(2, int(MAX_BATCH_DATASET_FRACTION * dataset_voxels / np.prod(patch)))
    batch = min(batch_budget, batch_cap)
    mem = estimate_memory_gb(patch, batch, net, in_channels, num_classes)
    notes = [
        f"patch {patch} at spacing {list(spacing)} covers {_r(np.prod(patch) / np.prod(median_shape) * 100)}% of "
        f"the median image {[round(m) for m in median_shape]}; "
        + ("sized for CPU compute" if cpu else f"shrunk {shrinks} time(s) to fit {budget_gb:g} GB"),
        f"{len(net['strides'])} stages, strides {net['strides']}, features {net['features']}",
        f"batch {batch}: {'the CPU preset' if cpu else 'memory'} allows {batch_budget}, 5% of the dataset's voxels "
        f"allows {batch_cap}; "
        f"estimated training memory {_r(mem)} GB",
    ]
    return {
        "patch_size": patch,
        "batch_size": int(batch),
        "network": {
            "encoder": "plain",
            "strides": net["strides"],
            "kernel_sizes": net["kernel_sizes"],
            "features": net["features"],
            "convs_per_stage": 2,
            "deep_supervision": True,
        },
        "estimated_memory_gb": _r(mem),
        "notes": notes,
    }


def normalization(fingerprint: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """One normalisation entry per channel (see module docstring) and the notes explaining them."""
    entries, notes = [], []
    for ch, name in sorted(fingerprint["channel_names"].items(), key=lambda kv: int(kv[0])):
        if name.strip().lower() == "ct":
            st = fingerprint["intensity"][ch]
            entries.append(
                {
                    "channel": int(ch),
                    "scheme": "ct",
                    "clip": [st["p00_5"], st["p99_5"]],
                    "mean": st["mean"],
                    "std": st["std"],
                }
            )
            notes.append(
                f"channel {ch} ({name}): CT, clip to foreground [{st['p00_5']}, {st['p99_5']}] then "
                f"(x - {st['mean']}) / {st['std']}"
            )
        else:
            entries.append({"channel": int(ch), "scheme": "zscore"})
            notes.append(f"channel {ch} ({name}): not CT, z-score per image")
    return entries, notes


def _median_shape_at(fp: dict[str, Any], spacing: Sequence[float]) -> list[float]:
    shapes = np.array([c["shape_after_crop"] for c in fp["cases"]], dtype=np.float64)
    spacings = np.array([c["spacing"] for c in fp["cases"]], dtype=np.float64)
    return [_r(v) for v in np.percentile(shapes * spacings / np.array(spacing), 50, axis=0)]


def foreground_share(fingerprint: dict[str, Any]) -> float:
    """Share of the cropped image's voxels carrying any non-background label (``class_fractions``; background is
    label 0)."""
    return float(sum(f for k, f in fingerprint["class_fractions"].items() if int(k) != 0))


def plan(fingerprint: dict[str, Any], gpu_memory_gb: float = 8.0, device: str = "gpu") -> dict[str, Any]:
    """Plans for ``2d``, ``3d_fullres`` and, when needed, ``3d_lowres`` and ``3d_cascade`` from a fingerprint (pure, deterministic).

    ``device`` is what training will run on: ``gpu`` fits patch and batch to ``gpu_memory_gb``; ``cpu`` sizes
    the network for compute so training is practical without an accelerator.
    """
    if device not in ("gpu", "cpu"):
        raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")
    fp = fingerprint
    spacings = np.array([c["spacing"] for c in fp["cases"]], dtype=np.float64)
    shapes = np.array([c["shape_after_crop"] for c in fp["cases"]], dtype=np.float64)
    in_channels = len(fp["channel_names"])
    label_values = {v for val in fp["labels"].values() for v in (val if isinstance(val, list) else [val])}
    num_classes = len(label_values)
    spacing, spacing_note = fullres_spacing(spacings, shapes)
    median = _median_shape_at(fp, spacing)
    dataset_voxels = float(np.sum(np.prod(shapes * spacings / np.array(spacing), axis=1)))
    resampling = {"image_order": 3, "label_order": 1, "out_of_plane_order": 0, "anisotropy_threshold": ANISOTROPY}

    def config(sp: list[float], med: list[float], dims: int, data_identifier: str) -> dict[str, Any]:
        fit = fit_configuration(
            sp[-dims:], med[-dims:], dataset_voxels, gpu_memory_gb, in_channels, num_classes, device
        )
        return {
            "dims": dims,
            "data_identifier": data_identifier,
            "spacing": sp,
            "median_shape": med,
            **fit,
            "resampling": resampling,
        }

    fullres = config(spacing, median, 3, "3d_fullres")
    fullres["notes"].insert(0, spacing_note)
    twod = config(spacing, median, 2, "3d_fullres")
    twod["notes"].insert(0, "2d trains on axial slices of the 3d_fullres data (same spacing, preprocessed once)")
    configurations = {"2d": twod, "3d_fullres": fullres}
    coverage = np.prod(fullres["patch_size"]) / np.prod(median)
    foreground = foreground_share(fp)
    cascade = foreground < CASCADE_FOREGROUND
    if coverage < LOWRES_COVERAGE:
        lr_spacing = list(spacing)
        for _ in range(200):
            coarsest = max(lr_spacing)
            if coarsest > min(lr_spacing) * 1.0001:  # bring the fine axes up to the coarse one first
                lr_spacing = [_r(min(s * LOWRES_STEP, coarsest)) for s in lr_spacing]
            else:
                lr_spacing = [_r(s * LOWRES_STEP) for s in lr_spacing]
            lr_median = _median_shape_at(fp, lr_spacing)
            lowres = config(lr_spacing, lr_median, 3, "3d_lowres")
            if np.prod(lowres["patch_size"]) / np.prod(lr_median) >= LOWRES_COVERAGE:
                break
        lowres["notes"].insert(
            0,
            f"3d_fullres patch covers {_r(coverage * 100)}% (< {LOWRES_COVERAGE * 100:g}%) of the median image, "
            f"so a low-resolution stage at spacing {lr_spacing} mm sees more context",
        )
        configurations["3d_lowres"] = lowres
    elif cascade:
        lr_spacing = [_r(s * CASCADE_LOWRES_FACTOR) for s in spacing]
        lowres = config(lr_spacing, _median_shape_at(fp, lr_spacing), 3, "3d_lowres")
        lowres["notes"].insert(
            0,
            f"3d_fullres patch covers {_r(coverage * 100)}% (>= {LOWRES_COVERAGE * 100:g}%) of the median image, "
            f"but 3d_cascade needs a whole-volume organ stage: {CASCADE_LOWRES_FACTOR:g}x the full-resolution "
            f"spacing, {lr_spacing} mm",
        )
        configurations["3d_lowres"] = lowres
    cascade_note = (
        f"labelled foreground fills {_r(foreground * 100)}% of the cropped image "
        f"({'<' if cascade else '>='} {CASCADE_FOREGROUND * 100:g}%): "
        + ("3d_cascade (3d_lowres organs, then 3d_fullres inside their boxes) is proposed" if cascade
           else "no 3d_cascade (organ boxes would cover most of the image)")
    )
    if cascade:
        configurations["3d_cascade"] = {
            **copy.deepcopy(fullres),
            "previous_stage": "3d_lowres",
            "roi_margin_mm": CASCADE_MARGIN_MM,
        }
        configurations["3d_cascade"]["notes"].insert(
            0,
            f"{cascade_note}; stage 2 is 3d_fullres restricted to boxes around the 3d_lowres foreground grown by "
            f"{CASCADE_MARGIN_MM:g} mm (same data and network, no extra input channel: see autoseg.inference.cascade)",
        )
    norm, norm_notes = normalization(fp)
    plans = {
        "schema_version": SCHEMA_VERSION,
        "autoseg_version": __version__,
        "dataset_name": fp["dataset_name"],
        "channel_names": dict(fp["channel_names"]),
        "labels": dict(fp["labels"]),
        "device": device,
        "gpu_memory_gb": gpu_memory_gb,
        "normalization": norm,
        "configurations": configurations,
        "notes": [spacing_note, cascade_note] + norm_notes,
    }
    if "regions_class_order" in fp:
        plans["regions_class_order"] = list(fp["regions_class_order"])
    validate(plans, "plans")
    return plans
