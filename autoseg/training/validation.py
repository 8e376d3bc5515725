"""Validation of a trained fold: predict every validation case with the inference code path, save it, and score it
against the raw label map (Dice per predicted label), written to ``fold_<k>/validation/summary.json``.

A cascade fold (configuration with ``previous_stage``) is validated as it will predict: the trained stage-1 model
of the same fold segments each case on its own preprocessed grid, and the fold's model runs only inside the ROI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import write_json
from ..errors import AutosegError
from ..inference.cascade import stage2_boxes
from ..inference.predictor import Predictor, cascade_log, predict_probabilities, previous_stage_dir, probe_precision
from ..inference.uncertainty import expected_dice
from ..jsonfile import read_json
from ..io.images import read_image, write_image, write_probabilities
from ..labels import LabelSpec, labels_from_probabilities
from ..layout import SUMMARY_JSON, VALIDATION, preprocessed_files
from ..precision import Precision
from ..masks import dice_per_label


def _stage1(out: Path, config: dict[str, Any], device: torch.device, mirror: bool) -> Predictor | None:
    """The trained stage-1 predictor of this fold for a cascade configuration, else None."""
    if "previous_stage" not in config:
        return None
    fold = out.name.removeprefix("fold_")
    return Predictor.from_trained(previous_stage_dir(out.parent, config, [fold]), [fold], device=str(device),
                                  mirror=mirror)


def _load_case(folder: Path, case: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Image (memory-mapped) and properties of one preprocessed case of ``folder`` (a data identifier)."""
    files = preprocessed_files(case)
    fix = f"rerun `autoseg plan_and_preprocess -c {folder.name}` to regenerate the case"
    props = read_json(folder / files["props"], fix, "case_properties")
    try:
        data = np.load(folder / files["data"], mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise AutosegError(f"{folder / files['data']}: missing or unreadable ({e}); {fix}") from None
    return data, props


def validate_fold(model: torch.nn.Module, data_folder: Path, out: Path, val_ids: list[str], config: dict[str, Any],
                  meta: dict[str, Any], raw_labels: Path, regions_class_order: list[int] | None, device: torch.device,
                  save_probabilities: bool = False, precision: Precision | None = None) -> dict[str, Any]:
    """Predict each validation case to ``out/validation`` and score it against the raw label.

    ``precision``: the mode to predict in; None measures it on ``model`` (:func:`probe_precision`)."""
    folder = out / VALIDATION
    labels = LabelSpec.from_meta(meta).predicted_values()
    # mirroring multiplies the cost by 2**dims: worth it on a GPU, not in a CPU training job
    mirror = device.type == "cuda"
    stage1 = _stage1(out, config, device, mirror)
    if precision is None:
        precision = probe_precision([model], config["patch_size"], len(meta["channel_names"]), device)
    per_case, expected = {}, {}
    for case in val_ids:
        data, props = _load_case(data_folder, case)
        rois = None
        if stage1 is not None:
            low, _ = _load_case(data_folder.parent / stage1.config["data_identifier"], case)
            rois = stage2_boxes(stage1.labels_preprocessed(low), data.shape[1:], config)
            print(f"{case}: {cascade_log(out.parent.name, rois, data.shape[1:])}")
        probs, geometry = predict_probabilities([model], data, props, config, regions_class_order is not None,
                                                device, mirror=mirror, precision=precision, rois=rois)
        seg = labels_from_probabilities(probs, regions_class_order)
        if save_probabilities:  # for ensembles in find_best_configuration
            write_probabilities(folder / f"{case}.npz", probs, geometry)
        write_image(folder / f"{case}{meta['file_ending']}", seg, geometry)
        ref_path = raw_labels / f"{case}{meta['file_ending']}"
        if ref_path.is_file():
            per_case[case] = dice_per_label(seg, read_image(ref_path)[0], labels)
            expected[case] = expected_dice(probs, seg, labels, regions_class_order)  # calibrates the review flag
    mean = {str(v): float(np.mean([d[str(v)] for d in per_case.values()])) for v in labels} if per_case else {}
    summary = {"dice_per_case": per_case, "mean_dice": mean,
               "mean_foreground_dice": float(np.mean(list(mean.values()))) if mean else None,
               "expected_dice_per_case": expected}
    write_json(folder / SUMMARY_JSON, summary)
    return summary


