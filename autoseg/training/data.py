"""Training data: patch sampling from preprocessed cases, nnU-Net-style augmentation, deep-supervision targets.

Patches are read straight from memory-mapped ``.npy`` files (only the patch region is touched), so cases of any
size cost no RAM. When augmenting, the sampler reads an enlarged patch (large enough that rotation and scaling
never look past its edges) and the spatial transform cuts the final patch from its centre. Augmentation uses
batchgenerators, which draws from the global NumPy and Python random states; each batch seeds them from the
loader's own generator (and restores them afterwards), so batches are reproducible for a given seed and worker count.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from batchgenerators.transforms.abstract_transforms import Compose
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import AutosegError
from ..layout import preprocessed_files
from ..inference.cascade import roi_boxes
from .sampling import SamplingIndex, pick_voxel


@dataclass(frozen=True)
class AugmentConfig:
    """Every augmentation probability and range in one place (nnU-Net v2 defaults; p_* are per sample)."""

    rotation_3d_deg: float = 30.0  # +- about every axis, for roughly isotropic 3D patches
    rotation_2d_deg: float = 180.0  # +- in-plane, for 2D and for anisotropic 3D patches
    anisotropy_ratio: float = 3.0  # a 3D patch with max/min edge above this rotates in-plane only
    p_rotation: float = 0.2
    scale: tuple[float, float] = (0.7, 1.4)  # one isotropic factor; > 1 samples a larger region (zoom out)
    p_scale: float = 0.2
    noise_variance: tuple[float, float] = (0.0, 0.1)
    p_noise: float = 0.1
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_blur: float = 0.2
    p_blur_per_channel: float = 0.5
    brightness: tuple[float, float] = (0.75, 1.25)  # multiplicative
    p_brightness: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    lowres_zoom: tuple[float, float] = (0.5, 1.0)  # down (nearest) then up (cubic) again
    p_lowres: float = 0.25
    p_lowres_per_channel: float = 0.5
    gamma: tuple[float, float] = (0.7, 1.5)
    p_gamma_inverted: float = 0.1  # gamma on the inverted image (brightens dark structures' contrast)
    p_gamma: float = 0.3
    mirror: bool = True  # every spatial axis, each flipped with p 0.5 (fixed by batchgenerators)


AUGMENT = AugmentConfig()


@dataclass
class PreprocessedCase:
    """One preprocessed training case; ``data`` and ``seg`` are read-only memory maps."""

    case_id: str
    data: np.ndarray  # float32 (C, Z, Y, X)
    seg: np.ndarray  # uint8 (Z, Y, X)
    fg: dict[int, np.ndarray]  # label -> uint16 (K, 3) voxel coordinates
    components: dict[int, np.ndarray]  # label -> (K,) connected component of each coordinate


def _read(folder: Path, case_id: str, kind: str, reader: Any) -> Any:
    """``reader(path)`` of one file of a preprocessed case; any failure is an AutosegError saying how to redo it."""
    path = folder / preprocessed_files(case_id)[kind]
    try:
        return reader(path)
    except Exception as e:
        raise AutosegError(
            f"case {case_id}: cannot read {path} ({type(e).__name__}: {e}); delete {folder / case_id}.json and "
            "rerun `autoseg plan_and_preprocess` to regenerate this case (a rerun skips cases whose .json exists)"
        ) from e


def _read_fg_file(path: Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    with np.load(path, allow_pickle=False) as z:
        out = {}
        for key in z.files:
            if key.startswith("class_"):
                label = int(key.removeprefix("class_"))
                coords, comps = z[key], z[f"component_{label}"]  # KeyError: written by an older autoseg
                if coords.ndim != 2 or coords.shape[1] != 3 or comps.shape != coords.shape[:1]:
                    raise ValueError(f"class {label}: coordinates {coords.shape} and components {comps.shape}")
                out[label] = (coords, comps)
        return out


def read_foreground(folder: Path, case_id: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """label -> (stored voxel coordinates (K, 3), their connected component (K,)) of one preprocessed case."""
    return _read(Path(folder), case_id, "fg", _read_fg_file)


def load_case(folder: Path, case_id: str) -> PreprocessedCase:
    """Open the image, labels and foreground samples of a case written by ``preprocess`` (the properties are for the
    inverse, not for training); any missing or corrupt file is an AutosegError."""
    folder = Path(folder)
    data = _read(folder, case_id, "data", lambda p: np.load(p, mmap_mode="r", allow_pickle=False))
    seg = _read(folder, case_id, "seg", lambda p: np.load(p, mmap_mode="r", allow_pickle=False))
    fg = read_foreground(folder, case_id)
    if data.ndim != 4 or data.dtype != np.float32 or seg.shape != data.shape[1:] or seg.dtype != np.uint8:
        raise AutosegError(
            f"case {case_id}: image {data.dtype} {data.shape} and labels {seg.dtype} {seg.shape} in {folder} do not "
            "match (expected float32 (C,Z,Y,X) and uint8 (Z,Y,X)); rerun `autoseg plan_and_preprocess`"
        )
    return PreprocessedCase(case_id, data, seg, {c: v[0] for c, v in fg.items()}, {c: v[1] for c, v in fg.items()})


def sampling_index(folder: Path, case_ids: Sequence[str], tumour_values: Sequence[int],
                   config: dict[str, Any] | None = None) -> SamplingIndex:
    """The lesion-aware :class:`SamplingIndex` of ``case_ids`` (reads their small ``_fg.npz`` files). For a
    cascade's second stage (``config`` with ``previous_stage``) random patches are kept inside the ground truth's
    organ ROI boxes, found as prediction finds them on stage 1's result."""
    folder = Path(folder)
    fg = [read_foreground(folder, c) for c in case_ids]
    rois = None
    if config is not None and config.get("previous_stage"):
        rois = []
        for c in case_ids:
            seg = _read(folder, c, "seg", lambda p: np.load(p, mmap_mode="r", allow_pickle=False))
            rois.append(roi_boxes(np.asarray(seg) > 0, config["spacing"], float(config["roi_margin_mm"]),
                                  config["patch_size"]))
    return SamplingIndex.build(case_ids, fg, tumour_values, rois)


def sample_patch(
    case: PreprocessedCase,
    patch_size: Sequence[int],
    centre: np.ndarray | None,
    rng: np.random.Generator,
    inner: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut a (C, *patch) float32 image and (1, *patch) uint8 label patch, zero-padded outside the image.

    Placement is decided for the central ``inner`` region (default: the whole patch), which is what survives
    the centre crop after augmentation: it covers the image uniformly, or, given a ``centre`` voxel (z, y, x),
    contains it (jittered by up to a quarter of ``inner`` so objects are not always centred; see
    :mod:`.sampling` for how centres are chosen). A 2D patch (two sizes) comes from one axial slice.
    """
    patch = [int(p) for p in patch_size]
    inner = patch if inner is None else [int(i) for i in inner]
    voxel = None if centre is None else np.asarray(centre, dtype=np.int64)
    prefix: tuple[Any, ...] = ()
    shape = case.seg.shape
    if len(patch) == 2:
        z = int(voxel[0]) if voxel is not None else int(rng.integers(shape[0]))
        prefix, shape = (z,), shape[1:]
        voxel = None if voxel is None else voxel[1:]
    starts = []
    for d, (n, p, i) in enumerate(zip(shape, patch, inner)):
        lo, hi = min(0, n - i), max(0, n - i)  # inner-region start: inside the image, or covering it if smaller
        if voxel is None:
            s = int(rng.integers(lo, hi + 1))
        else:
            s = int(np.clip(voxel[d] - i // 2 + rng.integers(-(i // 4), i // 4 + 1), lo, hi))
        starts.append(s - (p - i) // 2)
    src = tuple(slice(max(s, 0), min(s + p, n)) for s, p, n in zip(starts, patch, shape))
    dst = tuple(slice(r.start - s, r.stop - s) for r, s in zip(src, starts))
    data = np.zeros((case.data.shape[0], *patch), dtype=np.float32)
    seg = np.zeros((1, *patch), dtype=np.uint8)
    data[(slice(None),) + dst] = case.data[(slice(None),) + prefix + src]
    seg[(0,) + dst] = case.seg[prefix + src]
    return data, seg


def _anisotropic_axis(patch_size: Sequence[int], aug: AugmentConfig) -> int | None:
    """The short axis of an anisotropic 3D patch (its in-plane rotation axis), else None."""
    if len(patch_size) == 3 and max(patch_size) / min(patch_size) > aug.anisotropy_ratio:
        return int(np.argmin(patch_size))
    return None


def _rotation_ranges(patch_size: Sequence[int], aug: AugmentConfig) -> list[float]:
    """Max rotation (radians) about axes 0, 1, 2 (batchgenerators' angle_x/y/z); 2D uses axis 0 only."""
    axis = 0 if len(patch_size) == 2 else _anisotropic_axis(patch_size, aug)
    if axis is None:
        return [float(np.deg2rad(aug.rotation_3d_deg))] * 3
    ranges = [0.0, 0.0, 0.0]
    ranges[axis] = float(np.deg2rad(aug.rotation_2d_deg))
    return ranges


def enlarged_patch_size(patch_size: Sequence[int], aug: AugmentConfig = AUGMENT) -> list[int]:
    """Patch to read so that any allowed rotation and scaling of ``patch_size`` stays inside it.

    Like nnU-Net's get_patch_size, but the extent is maximised over a grid of combined rotations (a single
    worst-case corner underestimates large in-plane ranges) and multiplied by the largest scale factor, which is
    how batchgenerators scales its sampling grid. The margin is kept even so the centre crop is exact.
    """
    size = np.array([1.0, *patch_size] if len(patch_size) == 2 else patch_size, dtype=np.float64)
    mats = []
    for axis, r in enumerate(_rotation_ranges(patch_size, aug)):
        a = np.linspace(-r, r, 25) if r > 0 else np.zeros(1)
        m = np.tile(np.eye(3), (len(a), 1, 1))
        i, j = [k for k in range(3) if k != axis]
        m[:, i, i], m[:, i, j], m[:, j, i], m[:, j, j] = np.cos(a), -np.sin(a), np.sin(a), np.cos(a)
        mats.append(m)
    rot = mats[0][:, None, None] @ mats[1][None, :, None] @ mats[2][None, None, :]
    extent = np.einsum("i,...ij->...j", size, np.abs(rot)).reshape(-1, 3).max(0) * max(aug.scale)
    extent = extent[1:] if len(patch_size) == 2 else extent
    return [p + 2 * int(np.ceil(max(e - p, 0) / 2 - 1e-6)) for p, e in zip(patch_size, extent)]


def build_transforms(patch_size: Sequence[int], aug: AugmentConfig = AUGMENT) -> Compose:
    """The batchgenerators pipeline: spatial (centre output), intensity, simulated low resolution, mirroring."""
    rx, ry, rz = _rotation_ranges(patch_size, aug)
    aniso = _anisotropic_axis(patch_size, aug)
    ts = [
        SpatialTransform(
            list(patch_size), do_elastic_deform=False, do_rotation=True, angle_x=(-rx, rx), angle_y=(-ry, ry),
            angle_z=(-rz, rz), p_rot_per_axis=1, p_rot_per_sample=aug.p_rotation, do_scale=True, scale=aug.scale,
            p_scale_per_sample=aug.p_scale, border_mode_data="constant", border_cval_data=0, order_data=3,
            border_mode_seg="constant", border_cval_seg=0, order_seg=0, random_crop=False,
        ),
        GaussianNoiseTransform(aug.noise_variance, p_per_sample=aug.p_noise),
        GaussianBlurTransform(aug.blur_sigma, different_sigma_per_channel=True, p_per_sample=aug.p_blur,
                              p_per_channel=aug.p_blur_per_channel),
        BrightnessMultiplicativeTransform(aug.brightness, p_per_sample=aug.p_brightness),
        ContrastAugmentationTransform(aug.contrast, p_per_sample=aug.p_contrast),
        SimulateLowResolutionTransform(aug.lowres_zoom, per_channel=True, p_per_channel=aug.p_lowres_per_channel,
                                       order_downsample=0, order_upsample=3, p_per_sample=aug.p_lowres,
                                       ignore_axes=None if aniso is None else (aniso,)),
        GammaTransform(aug.gamma, invert_image=True, per_channel=True, retain_stats=True,
                       p_per_sample=aug.p_gamma_inverted),
        GammaTransform(aug.gamma, invert_image=False, per_channel=True, retain_stats=True, p_per_sample=aug.p_gamma),
    ]
    if aug.mirror:
        ts.append(MirrorTransform(tuple(range(len(patch_size)))))
    return Compose(ts)


def downsample_labels(seg: np.ndarray, scale: Sequence[float]) -> np.ndarray:
    """Nearest-neighbour downsampling of (B, C, *spatial) labels to round(n * scale) voxels per axis.

    Output voxel i takes input voxel floor(i * n / m): plain striding (seg[..., ::2]) for integer factors,
    which lines up with the voxels a strided convolution is centred on.
    """
    for axis, (n, s) in enumerate(zip(seg.shape[2:], scale), start=2):
        m = max(1, int(round(n * s)))
        if m != n:
            seg = np.take(seg, np.arange(m) * n // m, axis=axis)
    return seg


def region_targets(seg: np.ndarray, regions: list[list[int]]) -> np.ndarray:
    """(R, *seg.shape) uint8: channel r is 1 where the label is one of ``regions[r]`` (nnU-Net region training)."""
    return np.stack([np.isin(seg, r) for r in regions]).astype(np.uint8)


def _seeded(transforms: Compose, batch: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Run batchgenerators from ``seed`` without disturbing the caller's global random state.

    It draws from both NumPy's global generator and Python's ``random`` (noise variance, blur sigma).
    """
    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(seed)
    random.seed(seed)
    try:
        return transforms(**batch)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


class _Batches(IterableDataset):
    """Endless batches from one random stream per worker, seeded with (seed, worker index)."""

    def __init__(self, folder: Path, sampling: SamplingIndex, patch: list[int], batch_size: int,
                 ds_scales: list[list[float]], seed: int, augment: bool, regions: list[list[int]] | None):
        self.folder, self.sampling, self.patch, self.batch_size = folder, sampling, patch, batch_size
        self.ds_scales, self.seed, self.regions = ds_scales, seed, regions
        self.read_size = enlarged_patch_size(patch) if augment else patch
        self.transforms = build_transforms(patch) if augment else None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        rng = np.random.default_rng([self.seed, 0 if info is None else info.id])
        cache: dict[str, PreprocessedCase] = {}
        while True:
            yield self._batch(rng, cache)

    def _patch(self, rng: np.random.Generator, cache: dict[str, PreprocessedCase]) -> tuple[str, np.ndarray, np.ndarray]:
        index, label, component = self.sampling.draw(rng)
        key = self.sampling.case_ids[index]
        try:
            if key not in cache:
                cache[key] = load_case(self.folder, key)
            case = cache[key]
            if label is None:
                centre = self.sampling.random_centre(index, rng)
            else:
                centre = pick_voxel(case.fg[label], case.components[label], component, rng)
            return (key, *sample_patch(case, self.read_size, centre, rng, inner=self.patch))
        except Exception as e:
            raise AutosegError(f"training case {key}: {type(e).__name__}: {e}") from e

    def _batch(self, rng: np.random.Generator, cache: dict[str, PreprocessedCase]) -> dict[str, Any]:
        patches = [self._patch(rng, cache) for _ in range(self.batch_size)]
        keys = [p[0] for p in patches]
        batch = {"data": np.stack([p[1] for p in patches]), "seg": np.stack([p[2] for p in patches])}
        if self.transforms is not None:
            try:
                batch = _seeded(self.transforms, batch, int(rng.integers(2**32)))
            except Exception as e:
                raise AutosegError(f"augmenting cases {keys}: {type(e).__name__}: {e}") from e
        targets = []
        for scale in self.ds_scales:
            t = downsample_labels(batch["seg"], scale).astype(np.int64)
            if self.regions is not None:
                t = np.ascontiguousarray(region_targets(t[:, 0], self.regions).swapaxes(0, 1), dtype=np.float32)
            targets.append(torch.from_numpy(np.ascontiguousarray(t)))
        data = torch.from_numpy(np.ascontiguousarray(batch["data"], dtype=np.float32))
        return {"data": data, "target": targets, "keys": keys}


class BatchLoader:
    """Iterator of training batches ``{"data", "target" (one per deep-supervision scale), "keys"}``.

    Batch k comes from worker k % num_workers (torch's DataLoader returns worker results in order), so the
    sequence depends only on seed and num_workers; num_workers=0 equals num_workers=1, computed in-process.
    """

    def __init__(
        self,
        folder: Path,
        case_ids: list[str],
        config: dict[str, Any],
        ds_scales: list[list[float]],
        batch_size: int | None = None,
        seed: int = 0,
        num_workers: int = 2,
        augment: bool = True,
        regions: list[list[int]] | None = None,
        sampling: SamplingIndex | None = None,
    ):
        folder = Path(folder)
        patch = [int(p) for p in config["patch_size"]]
        if not case_ids:
            raise AutosegError(f"no training cases given for {folder}")
        missing = [c for c in case_ids if not (folder / preprocessed_files(c)["props"]).is_file()]
        if missing:
            raise AutosegError(f"preprocessed case(s) {missing} not found in {folder}; "
                               "rerun `autoseg plan_and_preprocess` for this configuration")
        if not ds_scales or any(len(s) != len(patch) for s in ds_scales):
            raise ValueError(f"ds_scales {ds_scales} must be non-empty with {len(patch)} factors each")
        self.batch_size = int(batch_size or config["batch_size"])
        if sampling is None:
            sampling = sampling_index(folder, case_ids, ())
        elif list(sampling.case_ids) != list(case_ids):
            raise ValueError("the sampling index was built for other cases than the loader's")
        self.dataset = _Batches(folder, sampling, patch, self.batch_size, ds_scales, seed, augment, regions)
        self._loader: DataLoader | None = DataLoader(
            self.dataset, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
        self._it: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._loader is None:
            raise RuntimeError("BatchLoader is closed")
        if self._it is None:
            self._it = iter(self._loader)
        return next(self._it)

    def close(self) -> None:
        """Stop the worker processes (dropping the last references to the DataLoader shuts them down)."""
        self._it = None
        self._loader = None
