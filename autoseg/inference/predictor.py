"""Sliding-window inference: the one implementation shared by training validation and ``autoseg predict``.

Tiles of the network's patch size are placed with a step of ``step`` patch sizes, each tile's logits are weighted
by a Gaussian importance map (sigma = 1/8 of the patch; tile centres are trusted more than borders) and
accumulated in float32, then divided by the summed weights. Optional mirroring test-time augmentation averages
the logits over every combination of flipped axes. A 2D network runs over the axial slices of a 3D volume.

Precision and memory format are measured, not assumed (:mod:`autoseg.precision`): each :class:`Predictor` times a
forward pass of a tile batch of its network in float32 and, where the hardware runs it natively, bfloat16 (fp16
on CUDA without bf16), each with and without channels-last, and runs the sliding window in the fastest sound mode.

A configuration with ``previous_stage`` (``3d_cascade``) first predicts that stage on the whole volume, then runs
its own sliding window only inside boxes around the stage-1 foreground (:mod:`autoseg.inference.cascade`).

``predict --uncertainty`` keeps what the averaging throws away: each mirroring's probabilities and entropy are summed
next to the logits (``members=True``), the folds' sums are combined into the mutual information, and
:func:`write_uncertainty` writes the maps and the review flag (:mod:`autoseg.inference.uncertainty`). The logits,
hence the mask, are the same with and without it.
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

from ..atomic import json_safe, remove_stale_temporaries, write_json
from ..checkpoint import load_weights, pick_device
from ..errors import AutosegError
from ..io.dataset import load_dataset_json
from ..io.images import Geometry, write_image, write_probabilities
from ..io.inputs import InputCase, find_inputs, read_input
from ..io.outputs import finished, label_output, record_model, require_sources, write_labels
from ..jsonfile import read_json
from ..labels import LabelSpec, labels_from_probabilities
from ..layout import PLANS_JSON, UNCERTAINTY, checkpoint_file, fold_dir, trained_folds, uncertainty_files
from ..network import build_network
from ..memory import require_memory
from ..precision import Precision, probe
from ..preprocessing.preprocess import preprocess_case, restore_probabilities, target_shape
from ..preprocessing.resample import case_memory_bytes
from .cascade import Box, predict_in_rois, roi_fraction, stage2_boxes
from .identity import model_identity
from .engines import engine_networks
from .postprocess import apply_postprocessing
from .progress import TileProgress
from .uncertainty import case_uncertainty, member_statistics, mutual_information


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


def _forward(net: nn.Module, x: torch.Tensor, mirror_axes: Sequence[int],
             member: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Logits for a batch of tiles, averaged over all flips of ``mirror_axes`` (spatial axes, 0-based);
    ``member(logits)`` is also given each flip's own logits (the members of :mod:`autoseg.inference.uncertainty`)."""
    out = net(x).float()
    if member is not None:
        member(out)
    combos = [c for r in range(1, len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, r)]
    for combo in combos:
        dims = [a + 2 for a in combo]
        flipped = torch.flip(net(torch.flip(x, dims)).float(), dims)
        if member is not None:
            member(flipped)
        out = out + flipped  # not in place: net may return its input
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
    precision: Precision | None = None,
    progress: Callable[[int, int], None] | None = None,
    members: bool = False,
    regions: bool = False,
) -> torch.Tensor:
    """Logits (num_outputs, *spatial) float32 on the CPU for ``data`` (C, *spatial) with a network in eval mode.

    With ``members`` (for ``predict --uncertainty``) ``num_outputs + 1`` channels follow the logits: every member's
    (mirroring's) probabilities (sigmoid for ``regions``, else softmax) and their entropy
    (:func:`~autoseg.inference.uncertainty.member_statistics`), averaged over the members with the tiles' weights.

    ``patch`` has 2 entries for a 2D network (run slice by slice over axis 0 of 3D data) or 3 for a 3D one.
    Images smaller than the patch are padded with zeros (the normalised background) and cropped back.
    ``precision`` (default float32) sets the autocast dtype and whether tiles go in channels-last; the network's
    weights should already be in that memory format (:func:`probe_precision` leaves them so).
    ``progress(done, total)`` is called after each batch of tiles (a CPU case can take minutes).
    """
    device = torch.device(device)
    precision = precision or Precision()
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
    stats = torch.zeros((num_outputs + 1, *padded), dtype=torch.float32, device=device) if members else None
    starts = [tile_starts(s, p, step) for s, p in zip(padded, full_patch)]
    tiles = [tuple(slice(a, a + p) for a, p in zip(st, full_patch)) for st in itertools.product(*starts)]
    for i in range(0, len(tiles), tile_batch):
        group = tiles[i : i + tile_batch]
        x = torch.stack([data[(slice(None),) + t] for t in group]).to(device, non_blocking=True)
        if two_d:
            x = x[:, :, 0]
        if precision.channels_last and x.ndim == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        tile_stats: list[torch.Tensor] = []  # running sum over this batch's members

        def member(o: torch.Tensor) -> None:
            m = member_statistics(o, regions)
            tile_stats.append(tile_stats.pop() + m if tile_stats else m)

        with precision.autocast(device):
            out = _forward(net, x, mirror_axes, member if members else None)
        if two_d:
            out = out[:, :, None]
        for t, o in zip(group, out):
            logits[(slice(None),) + t] += o * weight
            norm[t] += weight
        if stats is not None:
            summed = tile_stats[0][:, :, None] if two_d else tile_stats[0]
            for t, m in zip(group, summed):
                stats[(slice(None),) + t] += m * (weight / (2 ** len(mirror_axes)))
        if progress is not None:
            progress(min(i + tile_batch, len(tiles)), len(tiles))
    logits /= norm
    if stats is not None:
        logits = torch.cat([logits, stats / norm])
    if any(pad):
        logits = logits[(slice(None),) + tuple(slice(p // 2, p // 2 + s) for p, s in zip(pad, spatial))]
    return logits.cpu()


def probe_precision(models: Sequence[nn.Module], patch: Sequence[int], in_channels: int, device: torch.device,
                    requested: str = "auto", tile_batch: int = 2) -> Precision:
    """Time one forward pass of a tile batch (random data of the patch shape) per candidate mode on ``device`` and
    return the fastest sound one (:func:`autoseg.precision.probe`); every model is left in its memory format."""
    device = torch.device(device)
    net = models[0]
    net.eval()
    net.deep_supervision = False
    x = torch.randn((tile_batch, in_channels, *patch), generator=torch.Generator().manual_seed(0)).to(device)

    def fmt(channels_last: bool) -> torch.memory_format:
        return torch.channels_last_3d if channels_last and x.ndim == 5 else torch.contiguous_format

    def run(mode: str, channels_last: bool) -> torch.Tensor:
        net.to(memory_format=fmt(channels_last))
        with torch.inference_mode(), Precision(mode, channels_last).autocast(device):
            return net(x.contiguous(memory_format=fmt(channels_last))).float()

    chosen = probe(run, device, len(patch), requested)
    for m in models:
        m.to(memory_format=fmt(chosen.channels_last))
    return chosen


def predict_preprocessed(
    models: Sequence[nn.Module],
    data: np.ndarray,
    config: dict,
    regions: bool,
    device: torch.device,
    mirror: bool = True,
    step: float = 0.5,
    precision: Precision | None = None,
    rois: Sequence[Box] | None = None,
    progress: Callable[[int, int], None] | None = None,
    uncertainty: bool = False,
) -> np.ndarray:
    """Probabilities (C, *spatial) float32 for one preprocessed case (C, *spatial), on the preprocessed grid.

    Each model (fold) runs the sliding window; softmax (or sigmoid for regions) probabilities are averaged over
    models. With ``rois`` the networks see only those boxes and everything outside them is background.
    ``progress`` as in :func:`sliding_window` (called per window, so per box and fold). With ``uncertainty`` one
    more channel follows: the mutual information over every (fold, mirroring) member
    (:func:`~autoseg.inference.uncertainty.mutual_information`; 0 outside the ROI boxes).
    """
    patch = config["patch_size"]
    n_out = models[0].num_outputs

    def window(image: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.array(image, dtype=np.float32))
        total = stats = None
        for net in models:
            net.eval()
            net.deep_supervision = False
            logits = sliding_window(net, x, patch, net.num_outputs, step=step,
                                    mirror_axes=tuple(range(len(patch))) if mirror else (), device=device,
                                    precision=precision, progress=progress, members=uncertainty, regions=regions)
            if uncertainty:
                logits, member = logits[:n_out], logits[n_out:]
                stats = member if stats is None else stats + member  # inference tensors: not in place
            p = torch.sigmoid(logits) if regions else torch.softmax(logits, 0)
            total = p if total is None else total.add_(p)
        probs = total / len(models)
        if stats is not None:
            stats = stats / len(models)
            probs = torch.cat([probs, mutual_information(stats[:n_out], stats[n_out], regions)[None]])
        return probs.numpy()

    if rois is None:
        return window(data)
    return predict_in_rois(window, data, rois, n_out + int(uncertainty), background_channel=not regions)


def predict_probabilities(
    models: Sequence[nn.Module],
    data: np.ndarray,
    props: dict,
    config: dict,
    regions: bool,
    device: torch.device,
    mirror: bool = True,
    step: float = 0.5,
    precision: Precision | None = None,
    rois: Sequence[Box] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, "Geometry"]:
    """Probabilities (C, *original shape) float32 on the original grid for one preprocessed case:
    :func:`predict_preprocessed`, then resampled back and uncropped exactly (``restore_probabilities``)."""
    probs = predict_preprocessed(models, data, config, regions, device, mirror, step, precision, rois, progress)
    return restore_probabilities(probs, props, background_channel=not regions)


def cascade_log(configuration: str, boxes: Sequence[Box], shape: Sequence[int]) -> str:
    """One line saying where stage 2 looked (or that stage 1 found nothing, so the case is all background)."""
    if not boxes:
        return f"{configuration}: stage 1 found no foreground; the case is all background"
    return (f"{configuration}: stage 2 in {len(boxes)} ROI box(es), {roi_fraction(boxes, shape) * 100:.1f}% of "
            f"the {'x'.join(map(str, shape))} volume")


def previous_stage_dir(config_dir: Path, config: dict, folds: Sequence[str], checkpoint: str = "final") -> Path:
    """The trained stage-1 folder of a cascade configuration (sibling ``<previous_stage>``), checked to hold
    ``folds``; the error names the folder and the command that trains what is missing."""
    previous = config["previous_stage"]
    stage1 = config_dir.parent / previous
    missing = [f for f in folds if f not in trained_folds(stage1, checkpoint)]
    if missing:
        dataset = config_dir.parent.name
        commands = "; ".join(f"autoseg train -d {dataset} -c {previous} -f {f}" for f in missing)
        raise AutosegError(f"{stage1}: {config_dir.name} needs its stage 1 ({previous}) trained for fold(s) "
                           f"{', '.join(missing)} (no checkpoint_{checkpoint} there); train it first: {commands}")
    return stage1


class Predictor:
    """A trained configuration ready to predict: plans, one network per fold, the inference settings, the measured
    precision and, for a cascade, the stage-1 :class:`Predictor`.

    >>> p = Predictor.from_trained(results / "Dataset501_X" / "3d_fullres", folds=[0])  # doctest: +SKIP
    >>> probs = p.predict_array(image_czyx, geometry)  # (C, Z, Y, X) probabilities, no postprocessing  # doctest: +SKIP

    For label maps with the inference plan's postprocessing use :func:`autoseg.segment`.
    """

    def __init__(self, plans: dict, meta: dict, configuration: str, models: list[nn.Module],
                 device: torch.device, mirror: bool = True, step: float = 0.5, precision: Precision | None = None,
                 stage1: "Predictor | None" = None):
        self.plans, self.meta, self.configuration = plans, meta, configuration
        self.config = plans["configurations"][configuration]
        self.models, self.device, self.mirror, self.step = models, device, mirror, step
        self.precision = precision or Precision()
        if ("previous_stage" in self.config) != (stage1 is not None):
            raise AutosegError(f"{configuration}: a configuration with previous_stage needs a stage-1 predictor "
                               "and only such a configuration takes one")
        self.stage1 = stage1
        _, regions, self.regions_class_order = LabelSpec.from_meta(meta).layout()
        self.regions = regions is not None

    @classmethod
    def from_trained(cls, config_dir: str | Path, folds: Sequence[int | str] | None = None,
                     checkpoint: str = "final", device: str = "auto", mirror: bool = True,
                     step: float = 0.5, precision: str = "auto", engine: str = "torch") -> "Predictor":
        """Load ``<results>/<dataset>/<configuration>`` (plans, dataset.json, ``fold_*/checkpoint_<name>``) and
        measure the precision (``auto``, ``fp32``, ``bf16``, ``fp16``: see :mod:`autoseg.precision`). A cascade
        also loads its stage 1 (same folds) from the sibling ``<previous_stage>`` folder. ``engine``
        ``onnxruntime`` or ``openvino`` runs each fold's network exported to ONNX in that runtime (:mod:`.engines`),
        float32, after checking its logits against torch's; ``auto`` times torch and every installed runtime on the
        CPU and takes the fastest (a runtime only if 1.15x faster; torch where none is installed)."""
        config_dir = Path(config_dir)
        if not config_dir.is_dir():
            raise AutosegError(f"{config_dir}: not a trained configuration (no such folder); train it first")
        plans = read_json(config_dir / PLANS_JSON, "train the configuration again (it writes plans.json)", "plans")
        meta = load_dataset_json(config_dir)
        configuration = config_dir.name
        if configuration not in plans["configurations"]:
            raise AutosegError(f"{config_dir}: plans.json has no configuration {configuration}")
        config = plans["configurations"][configuration]
        available = trained_folds(config_dir, checkpoint)
        chosen = [str(f) for f in folds] if folds else available
        missing = [f for f in chosen if f not in available]
        if missing or not chosen:
            raise AutosegError(f"{config_dir}: no checkpoint_{checkpoint} for fold(s) {missing or 'any'} "
                               f"(trained: {available or 'none'}); train them or pick others with -f")
        stage1 = None
        if "previous_stage" in config:
            stage1 = cls.from_trained(previous_stage_dir(config_dir, config, chosen, checkpoint), chosen,
                                      checkpoint, device, mirror, step, precision, engine)
        dev = pick_device(device)
        n_out, _, _ = LabelSpec.from_meta(meta).layout()
        models = []
        for f in chosen:
            net = build_network(config, len(meta["channel_names"]), n_out)
            load_weights(checkpoint_file(fold_dir(config_dir, f), checkpoint), net)
            models.append(net.to(dev).eval())
        if engine in ("auto", "torch"):
            chosen_precision = probe_precision(models, config["patch_size"], len(meta["channel_names"]), dev,
                                               precision)
            print(f"{configuration}: precision {chosen_precision.mode}"
                  f"{' channels-last' if chosen_precision.channels_last else ''} on {dev} ({chosen_precision.reason}; "
                  f"measured s/step {chosen_precision.seconds or 'none'})")
        elif precision not in ("auto", "fp32"):
            raise AutosegError(f"--precision {precision} applies to --engine torch only; --engine {engine} runs "
                               "the exported float32 graph (leave --precision at auto)")
        else:
            chosen_precision = Precision()
        sources = [checkpoint_file(fold_dir(config_dir, f), checkpoint) for f in chosen]
        models, chosen_precision, why = engine_networks(engine, models, sources, config["patch_size"],
                                                        len(meta["channel_names"]), dev, chosen_precision)
        print(f"{configuration}: engine {why}")
        return cls(plans, meta, configuration, models, dev, mirror, step, chosen_precision, stage1)

    def preprocess(self, data: np.ndarray, geometry: "Geometry") -> tuple[np.ndarray, dict]:
        """The training preprocessing of a raw (C, Z, Y, X) image for this configuration: image and properties
        (``data`` itself is left as it is, so a cascade can preprocess it for both stages)."""
        try:
            pre, _, props = preprocess_case(data, None, geometry, self.config, self.plans["normalization"])
        except ValueError as e:
            raise AutosegError(str(e)) from None
        return pre, props

    @property
    def members(self) -> int:
        """How many predictions are averaged per voxel: folds times mirrorings (the uncertainty's members)."""
        return len(self.models) * (2 ** len(self.config["patch_size"]) if self.mirror else 1)

    def probabilities_preprocessed(self, pre: np.ndarray, rois: Sequence[Box] | None = None,
                                   progress: Callable[[int, int], None] | None = None,
                                   uncertainty: bool = False) -> np.ndarray:
        """Probabilities on the preprocessed grid of ``pre`` (this configuration's preprocessing of a case); with
        ``uncertainty`` the members' mutual information follows as one more channel."""
        return predict_preprocessed(self.models, pre, self.config, self.regions, self.device, self.mirror,
                                    self.step, self.precision, rois, progress, uncertainty)

    def labels_preprocessed(self, pre: np.ndarray, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Label map on the preprocessed grid of ``pre``: what a later cascade stage takes its ROI from."""
        return labels_from_probabilities(self.probabilities_preprocessed(pre, progress=progress),
                                         self.regions_class_order)

    def predict_array(self, data: np.ndarray, geometry: "Geometry",
                      progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Probabilities (C, Z, Y, X) on the original grid for a raw (C, Z, Y, X) image: same preprocessing code
        path as training, then the sliding window over every fold (inside the stage-1 ROI for a cascade) and the
        exact inverse. ``progress(done, total)`` is called per batch of tiles of each fold's sliding window."""
        return self.predict_array_members(data, geometry, progress, uncertainty=False)[0]

    def predict_array_members(self, data: np.ndarray, geometry: "Geometry",
                              progress: Callable[[int, int], None] | None = None,
                              uncertainty: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`predict_array` and, with ``uncertainty`` and more than one member, the members' mutual
        information (Z, Y, X) on the original grid (else None); the probabilities are the same either way."""
        pre, props = self.preprocess(data, geometry)
        rois = None
        if self.stage1 is not None:
            low = self.stage1.labels_preprocessed(self.stage1.preprocess(data, geometry)[0], progress)
            rois = stage2_boxes(low, pre.shape[1:], self.config)
            tqdm.write(cascade_log(self.configuration, rois, pre.shape[1:]))
        with_mi = uncertainty and self.members > 1
        probs, _ = restore_probabilities(self.probabilities_preprocessed(pre, rois, progress, with_mi), props,
                                         background_channel=not self.regions)
        if not with_mi:
            return probs, None
        return probs[:-1], probs[-1]


def write_uncertainty(folder: Path, case_id: str, ending: str, probs: np.ndarray, seg: np.ndarray,
                      geometry: "Geometry", predictors: Sequence[Predictor], mutual_info: np.ndarray | None,
                      review: dict | None) -> dict:
    """Write one case's uncertainty maps (float32 on the input's grid) and its summary JSON, written last
    (:func:`~autoseg.inference.uncertainty.case_uncertainty`); returns the summary."""
    spec = LabelSpec.from_meta(predictors[0].meta)
    names = {v: spec.names.get(v, str(v)) for v in spec.predicted_values()}
    maps, summary = case_uncertainty(probs, seg, predictors[0].regions_class_order, names,
                                     [v for v in spec.tumour_values() if v in names], mutual_info, review)
    files = uncertainty_files(case_id, ending)
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in maps.items():
        write_image(folder / files[name], arr, geometry)
    if mutual_info is None:  # a rerun with one member must not leave an older run's map beside the new ones
        (folder / files["mutual_information"]).unlink(missing_ok=True)
    summary = {"case": case_id, "members": sum(p.members for p in predictors),
               "configurations": [p.configuration for p in predictors],
               "maps": {name: files[name] for name in maps}, **summary}
    write_json(folder / files["summary"], json_safe(summary))
    return summary


def case_outputs(out_dir: Path, case_id: str, ending: str, output_format: str = "nifti",
                 save_probabilities: bool = False, uncertainty: bool = False) -> list[Path]:
    """The files one case's prediction writes and a rerun checks, the label map first."""
    return ([label_output(out_dir, case_id, output_format, ending)]
            + ([out_dir / f"{case_id}.npz"] if save_probabilities else [])
            + ([out_dir / UNCERTAINTY / uncertainty_files(case_id, ending)["entropy"]] if uncertainty else []))


def pending_cases(meta: dict, in_dir: Path, out_dir: Path, model: str, output_format: str = "nifti",
                  save_probabilities: bool = False, uncertainty: bool = False,
                  overwrite: bool = False) -> tuple[list[InputCase], list[str]]:
    """The cases of ``in_dir`` (see :func:`~autoseg.io.inputs.find_inputs`) still to predict into ``out_dir`` and
    the problems met finding them. Finished cases (complete outputs newer than their inputs, recorded as made by
    ``model``: :func:`~autoseg.inference.identity.model_identity`) are left out unless ``overwrite``. Creates
    ``out_dir`` and deletes the temporaries a killed run left there, so call it once per run, before any worker
    writes."""
    ending = meta["file_ending"]
    cases, problems = find_inputs(in_dir, ending, len(meta["channel_names"]))
    require_sources(output_format, cases, in_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)  # left by a run that was killed while writing
    todo = [c for c in cases if overwrite or not finished(
        out_dir, c.case_id, case_outputs(out_dir, c.case_id, ending, output_format, save_probabilities, uncertainty),
        c.images, model)]
    return todo, problems


def predict_case(
    predictors: Sequence[Predictor],
    case: InputCase,
    out_dir: Path,
    model: str,
    save_probabilities: bool = False,
    postprocessing: dict | None = None,
    output_format: str = "nifti",
    uncertainty: bool = False,
    review: dict | None = None,
) -> None:
    """Predict one case into ``out_dir``; probabilities of several predictors are averaged. Raises
    ``AutosegError`` for a bad case (unreadable, too large for memory, a full disk). Each output is written
    atomically and read back before it counts; the record that ``model`` made them comes last and marks the case
    finished. ``uncertainty`` adds the case's maps and review flag (:func:`write_uncertainty`)."""
    meta = predictors[0].meta
    ending = meta["file_ending"]
    written = case_outputs(out_dir, case.case_id, ending, output_format, save_probabilities, uncertainty)
    algorithm = {"configurations": "+".join(p.configuration for p in predictors), "model": model[:16]}
    outputs = predictors[0].models[0].num_outputs
    t0 = time.perf_counter()
    data, geometry = read_input(case)
    for p in predictors:  # every configuration's grid, before the first large allocation
        new_shape = target_shape(data.shape[1:], geometry.spacing_zyx, p.config["spacing"])
        require_memory(case_memory_bytes(data.shape[1:], new_shape, data.shape[0], outputs),
                       f"predicting {case.images[0]} ({tuple(data.shape[1:])} voxels of spacing "
                       f"{tuple(round(v, 3) for v in geometry.spacing_zyx)} mm, {tuple(new_shape)} at the "
                       f"model's spacing)", "check the spacing in the image header or use a machine with "
                       "more memory")
    passes = sum(len(p.models) + (len(p.stage1.models) if p.stage1 else 0) for p in predictors)
    with TileProgress(case.case_id, passes) as bar:  # a cascade adds a pass per further ROI box
        probs, mi = predictors[0].predict_array_members(data, geometry, bar.update, uncertainty)
        for p in predictors[1:]:
            more, more_mi = p.predict_array_members(data, geometry, bar.update, uncertainty)
            probs += more
            mi = more_mi if mi is None else mi if more_mi is None else mi + more_mi
    probs /= len(predictors)
    if mi is not None:  # across configurations: their mean (members within each are exact)
        mi /= sum(p.members > 1 for p in predictors)
    seg = labels_from_probabilities(probs, predictors[0].regions_class_order)
    if postprocessing:
        seg = apply_postprocessing(seg, postprocessing)
    if save_probabilities:
        write_probabilities(written[1], probs, geometry)
    if uncertainty:
        summary = write_uncertainty(out_dir / UNCERTAINTY, case.case_id, ending, probs, seg, geometry,
                                    predictors, mi, review)
        if summary["flag_for_review"]:
            tqdm.write(f"{case.case_id}: flagged for review: {'; '.join(summary['reasons'])}")
    write_labels(written[0], seg, geometry, case, output_format, meta, algorithm)
    record_model(out_dir, case.case_id, model, written)  # last: it marks the case finished
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    tqdm.write(f"{case.case_id}: {time.perf_counter() - t0:.1f} s, peak RSS {peak:.2f} GB")


def predict_folder(
    predictors: Sequence[Predictor],
    in_dir: Path,
    out_dir: Path,
    save_probabilities: bool = False,
    overwrite: bool = False,
    postprocessing: dict | None = None,
    output_format: str = "nifti",
    uncertainty: bool = False,
    review: dict | None = None,
) -> list[str]:
    """Predict every case of ``in_dir`` (a folder, an image file, a DICOM series folder or zip: see
    :func:`~autoseg.io.inputs.find_inputs`) into ``out_dir``; probabilities of several predictors are averaged.
    ``output_format``: ``nifti`` or ``dicom-seg`` (DICOM series only; :mod:`autoseg.io.outputs`).

    ``uncertainty`` also writes ``out_dir/uncertainty/`` (:func:`write_uncertainty`), flagging cases for review by
    the inference plan's calibrated ``review`` thresholds.

    Finished cases (complete outputs newer than their inputs, recorded as made by the same model) are skipped
    unless ``overwrite``; bad cases, including one too large for memory or a full disk, are reported (returned) by
    name and do not stop the others. Each output is written atomically and read back before it counts.
    """
    model = model_identity(predictors, postprocessing)
    cases, problems = pending_cases(predictors[0].meta, in_dir, out_dir, model, output_format, save_probabilities,
                                    uncertainty, overwrite)
    for case in tqdm(cases, desc="predict", unit="case"):
        try:
            predict_case(predictors, case, out_dir, model, save_probabilities, postprocessing, output_format,
                         uncertainty, review)
        except AutosegError as e:
            problems.append(f"case {case.case_id}: {e}")
    return problems
