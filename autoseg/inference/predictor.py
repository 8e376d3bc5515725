"""Sliding-window inference: the one implementation shared by training validation and ``autoseg predict``.

Tiles of the network's patch size are placed with a step of ``step`` patch sizes, each tile's logits are weighted
by a Gaussian importance map (sigma = 1/8 of the patch; tile centres are trusted more than borders) and
accumulated in float32, then divided by the summed weights. Optional mirroring test-time augmentation averages
the logits over every combination of flipped axes. A 2D network runs over the axial slices of a 3D volume.
"""

from __future__ import annotations

import itertools
import resource
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..atomic import remove_stale_temporaries
from ..checkpoint import load_weights, pick_device
from ..errors import AutosegError
from ..io.dataset import load_dataset_json
from ..io.images import Geometry, read_image, read_probabilities, write_image, write_probabilities
from ..io.inputs import find_inputs, read_input
from ..jsonfile import read_json
from ..labels import LabelSpec, labels_from_probabilities
from ..layout import PLANS_JSON, checkpoint_file, fold_dir, trained_folds
from ..network import build_network
from ..memory import require_memory
from ..preprocessing.preprocess import preprocess_case, restore_probabilities, target_shape
from ..preprocessing.resample import case_memory_bytes
from .postprocess import apply_postprocessing
from .progress import TileProgress


def gaussian_importance(patch: Sequence[int], sigma_scale: float = 1.0 / 8) -> torch.Tensor:
    """Separable Gaussian weights over a patch, max 1, strictly positive (so every voxel gets a weight)."""
    weights = torch.ones(tuple(patch), dtype=torch.float32)
    for ax, n in enumerate(patch):
        x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        g = torch.exp(-0.5 * (x / (n * sigma_scale)) ** 2).float()
        shape = [1] * len(patch)
        shape[ax] = n
        weights = weights * (g / g.max()).reshape(shape)
    return weights.clamp_min(1e-3)


def tile_starts(size: int, patch: int, step: float) -> list[int]:
    """Start offsets along one axis: evenly spread, first at 0, last flush with the end, overlap >= 1 - step."""
    if not 0 < step <= 1:  # 0 never advances, > 1 leaves voxels between tiles uncovered (NaN probabilities)
        raise AutosegError(f"sliding-window step {step} must be > 0 and <= 1 (a fraction of the patch); use 0.5")
    if size <= patch:
        return [0]
    n = int(np.ceil((size - patch) / (patch * step))) + 1
    # unique: a 1-voxel patch (the slice axis of a 2D network) would otherwise repeat starts and redo slices
    return sorted({int(round(v)) for v in np.linspace(0, size - patch, n)})


def _forward(net: nn.Module, x: torch.Tensor, mirror_axes: Sequence[int]) -> torch.Tensor:
    """Logits for a batch of tiles, averaged over all flips of ``mirror_axes`` (spatial axes, 0-based)."""
    out = net(x).float()
    combos = [c for r in range(1, len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, r)]
    for combo in combos:
        dims = [a + 2 for a in combo]
        out = out + torch.flip(net(torch.flip(x, dims)).float(), dims)  # not in place: net may return its input
    return out / (len(combos) + 1)


@torch.inference_mode()
def sliding_window(
    net: nn.Module,
    data: torch.Tensor,
    patch: Sequence[int],
    num_outputs: int,
    step: float = 0.5,
    mirror_axes: Sequence[int] = (),
    tile_batch: int = 2,
    device: torch.device | str = "cpu",
    autocast: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Logits (num_outputs, *spatial) float32 on the CPU for ``data`` (C, *spatial) with a network in eval mode.

    ``patch`` has 2 entries for a 2D network (run slice by slice over axis 0 of 3D data) or 3 for a 3D one.
    Images smaller than the patch are padded with zeros (the normalised background) and cropped back.
    ``progress(done, total)`` is called after each batch of tiles (a CPU case can take minutes).
    """
    device = torch.device(device)
    spatial = tuple(data.shape[1:])
    two_d = len(patch) == 2 and len(spatial) == 3
    full_patch = (1, *patch) if two_d else tuple(patch)
    pad = [max(0, p - s) for p, s in zip(full_patch, spatial)]
    if any(pad):
        widths = []
        for p in reversed(pad):
            widths += [p // 2, p - p // 2]
        data = nn.functional.pad(data, widths)
    padded = tuple(data.shape[1:])
    weight = gaussian_importance(patch).to(device)
    if two_d:
        weight = weight[None]
    logits = torch.zeros((num_outputs, *padded), dtype=torch.float32, device=device)
    norm = torch.zeros(padded, dtype=torch.float32, device=device)
    starts = [tile_starts(s, p, step) for s, p in zip(padded, full_patch)]
    tiles = [tuple(slice(a, a + p) for a, p in zip(st, full_patch)) for st in itertools.product(*starts)]
    dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    for i in range(0, len(tiles), tile_batch):
        group = tiles[i : i + tile_batch]
        x = torch.stack([data[(slice(None),) + t] for t in group]).to(device, non_blocking=True)
        if two_d:
            x = x[:, :, 0]
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            out = _forward(net, x, mirror_axes)
        if two_d:
            out = out[:, :, None]
        for t, o in zip(group, out):
            logits[(slice(None),) + t] += o * weight
            norm[t] += weight
        if progress is not None:
            progress(min(i + tile_batch, len(tiles)), len(tiles))
    logits /= norm
    if any(pad):
        logits = logits[(slice(None),) + tuple(slice(p // 2, p // 2 + s) for p, s in zip(pad, spatial))]
    return logits.cpu()


def predict_probabilities(
    models: Sequence[nn.Module],
    data: np.ndarray,
    props: dict,
    config: dict,
    regions: bool,
    device: torch.device,
    mirror: bool = True,
    step: float = 0.5,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, "Geometry"]:
    """Probabilities (C, *original shape) float32 on the original grid for one preprocessed case.

    Each model (fold) runs the sliding window; softmax (or sigmoid for regions) probabilities are averaged over
    models in the preprocessed space, then resampled back and uncropped exactly (``restore_probabilities``).
    """
    patch = config["patch_size"]
    x = torch.from_numpy(np.array(data, dtype=np.float32))
    total = None
    for net in models:
        net.eval()
        net.deep_supervision = False
        logits = sliding_window(net, x, patch, net.num_outputs, step=step,
                                mirror_axes=tuple(range(len(patch))) if mirror else (), device=device,
                                autocast=torch.device(device).type == "cuda", progress=progress)
        p = torch.sigmoid(logits) if regions else torch.softmax(logits, 0)
        total = p if total is None else total.add_(p)
    probs = (total / len(models)).numpy()
    return restore_probabilities(probs, props, background_channel=not regions)


class Predictor:
    """A trained configuration ready to predict: plans, one network per fold, and the inference settings.

    >>> p = Predictor.from_trained(results / "Dataset501_X" / "3d_fullres", folds=[0])  # doctest: +SKIP
    >>> probs = p.predict_array(image_czyx, geometry)  # (C, Z, Y, X) probabilities, no postprocessing  # doctest: +SKIP

    For label maps with the inference plan's postprocessing use :func:`autoseg.segment`.
    """

    def __init__(self, plans: dict, meta: dict, configuration: str, models: list[nn.Module],
                 device: torch.device, mirror: bool = True, step: float = 0.5):
        self.plans, self.meta, self.configuration = plans, meta, configuration
        self.config = plans["configurations"][configuration]
        self.models, self.device, self.mirror, self.step = models, device, mirror, step
        _, regions, self.regions_class_order = LabelSpec.from_meta(meta).layout()
        self.regions = regions is not None

    @classmethod
    def from_trained(cls, config_dir: str | Path, folds: Sequence[int | str] | None = None,
                     checkpoint: str = "final", device: str = "auto", mirror: bool = True,
                     step: float = 0.5) -> "Predictor":
        """Load ``<results>/<dataset>/<configuration>`` (plans, dataset.json, ``fold_*/checkpoint_<name>``)."""
        config_dir = Path(config_dir)
        if not config_dir.is_dir():
            raise AutosegError(f"{config_dir}: not a trained configuration (no such folder); train it first")
        plans = read_json(config_dir / PLANS_JSON, "train the configuration again (it writes plans.json)", "plans")
        meta = load_dataset_json(config_dir)
        configuration = config_dir.name
        if configuration not in plans["configurations"]:
            raise AutosegError(f"{config_dir}: plans.json has no configuration {configuration}")
        available = trained_folds(config_dir, checkpoint)
        chosen = [str(f) for f in folds] if folds else available
        missing = [f for f in chosen if f not in available]
        if missing or not chosen:
            raise AutosegError(f"{config_dir}: no checkpoint_{checkpoint} for fold(s) {missing or 'any'} "
                               f"(trained: {available or 'none'}); train them or pick others with -f")
        dev = pick_device(device)
        n_out, _, _ = LabelSpec.from_meta(meta).layout()
        models = []
        for f in chosen:
            net = build_network(plans["configurations"][configuration], len(meta["channel_names"]), n_out)
            load_weights(checkpoint_file(fold_dir(config_dir, f), checkpoint), net)
            models.append(net.to(dev).eval())
        return cls(plans, meta, configuration, models, dev, mirror, step)

    def predict_array(self, data: np.ndarray, geometry: "Geometry",
                      progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Probabilities (C, Z, Y, X) on the original grid for a raw (C, Z, Y, X) image: same preprocessing code
        path as training, then the sliding window over every fold and the exact inverse. ``progress(done, total)``
        is called per batch of tiles of each fold's sliding window."""
        try:
            pre, _, props = preprocess_case(data, None, geometry, self.config, self.plans["normalization"])
        except ValueError as e:
            raise AutosegError(str(e)) from None
        probs, _ = predict_probabilities(self.models, pre, props, self.config, self.regions, self.device,
                                         self.mirror, self.step, progress)
        return probs


def _finished(output: Path, inputs: Sequence[Path]) -> bool:
    """An output a rerun may keep: present, readable to the end, and newer than every input (an input edited or
    replaced since is predicted again)."""
    try:
        if output.stat().st_mtime_ns < max(p.stat().st_mtime_ns for p in inputs):
            return False
        if output.suffix == ".npz":
            read_probabilities(output)
        else:
            read_image(output)
    except (OSError, AutosegError):
        return False
    return True


def predict_folder(
    predictors: Sequence[Predictor],
    in_dir: Path,
    out_dir: Path,
    save_probabilities: bool = False,
    overwrite: bool = False,
    postprocessing: dict | None = None,
) -> list[str]:
    """Predict every case of ``in_dir`` (a folder, an image file, a DICOM series folder or zip: see
    :func:`~autoseg.io.inputs.find_inputs`) into ``out_dir``; probabilities of several predictors are averaged.

    Finished cases (complete outputs newer than their inputs) are skipped unless ``overwrite``; bad cases,
    including one too large for memory or a full disk, are reported (returned) by name and do not stop the others.
    Each output is written atomically and read back before it counts.
    """
    meta = predictors[0].meta
    ending = meta["file_ending"]
    cases, problems = find_inputs(in_dir, ending, len(meta["channel_names"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)  # left by a run that was killed while writing
    outputs = predictors[0].models[0].num_outputs
    for case in tqdm(cases, desc="predict", unit="case"):
        target = out_dir / f"{case.case_id}{ending}"
        npz = out_dir / f"{case.case_id}.npz"
        if not overwrite and _finished(target, case.images) and (not save_probabilities or _finished(npz, case.images)):
            continue
        t0 = time.perf_counter()
        try:
            data, geometry = read_input(case)
            for p in predictors:  # every configuration's grid, before the first large allocation
                new_shape = target_shape(data.shape[1:], geometry.spacing_zyx, p.config["spacing"])
                require_memory(case_memory_bytes(data.shape[1:], new_shape, data.shape[0], outputs),
                               f"predicting {case.images[0]} ({tuple(data.shape[1:])} voxels of spacing "
                               f"{tuple(round(v, 3) for v in geometry.spacing_zyx)} mm, {tuple(new_shape)} at the "
                               f"model's spacing)", "check the spacing in the image header or use a machine with "
                               "more memory")
            with TileProgress(case.case_id, sum(len(p.models) for p in predictors)) as bar:
                probs = predictors[0].predict_array(data, geometry, bar.update)
                for p in predictors[1:]:
                    probs += p.predict_array(data, geometry, bar.update)
            probs /= len(predictors)
            seg = labels_from_probabilities(probs, predictors[0].regions_class_order)
            if postprocessing:
                seg = apply_postprocessing(seg, postprocessing)
            if save_probabilities:
                write_probabilities(npz, probs, geometry)
            write_image(target, seg, geometry)  # last: its presence marks the case finished
        except AutosegError as e:
            problems.append(f"case {case.case_id}: {e}")
            continue
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        tqdm.write(f"{case.case_id}: {time.perf_counter() - t0:.1f} s, peak RSS {peak:.2f} GB")
    return problems
