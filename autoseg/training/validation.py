"""Validation of a trained fold: predict every validation case with the inference code path, save it, and score it
against the raw label map (Dice per predicted label), written to ``fold_<k>/validation/summary.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import write_json
from ..inference.predictor import predict_probabilities
from ..jsonfile import read_json
from ..io.images import read_image, write_image, write_probabilities
from ..labels import LabelSpec, labels_from_probabilities
from ..layout import SUMMARY_JSON, VALIDATION, preprocessed_files
from ..masks import dice_per_label


def validate_fold(model: torch.nn.Module, data_folder: Path, out: Path, val_ids: list[str], config: dict[str, Any],
                  meta: dict[str, Any], raw_labels: Path, regions_class_order: list[int] | None, device: torch.device,
                  save_probabilities: bool = False) -> dict[str, Any]:
    """Predict each validation case to ``out/validation`` and score it against the raw label."""
    folder = out / VALIDATION
    labels = LabelSpec.from_meta(meta).predicted_values()
    per_case = {}
    for case in val_ids:
        files = preprocessed_files(case)
        props = read_json(data_folder / files["props"], "rerun `autoseg plan_and_preprocess` to regenerate the case",
                          "case_properties")
        data = np.load(data_folder / files["data"], mmap_mode="r", allow_pickle=False)
        # mirroring multiplies the cost by 2**dims: worth it on a GPU, not in a CPU training job
        probs, geometry = predict_probabilities([model], data, props, config,
                                                regions_class_order is not None, device, mirror=device.type == "cuda")
        seg = labels_from_probabilities(probs, regions_class_order)
        if save_probabilities:  # for ensembles in find_best_configuration
            write_probabilities(folder / f"{case}.npz", probs, geometry)
        write_image(folder / f"{case}{meta['file_ending']}", seg, geometry)
        ref_path = raw_labels / f"{case}{meta['file_ending']}"
        if ref_path.is_file():
            per_case[case] = dice_per_label(seg, read_image(ref_path)[0], labels)
    mean = {str(v): float(np.mean([d[str(v)] for d in per_case.values()])) for v in labels} if per_case else {}
    summary = {"dice_per_case": per_case, "mean_dice": mean,
               "mean_foreground_dice": float(np.mean(list(mean.values()))) if mean else None}
    write_json(folder / SUMMARY_JSON, summary)
    return summary


