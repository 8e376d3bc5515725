"""Shared by the tests of issue 14 (DICOM, single files, the Python API): a tiny untrained-but-fixed model folder and
a phantom case on a right-handed grid (a DICOM series cannot store a left-handed one)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from autoseg.checkpoint import save_checkpoint
from autoseg.io.images import Geometry
from autoseg.labels import DEFAULT_LABELS
from autoseg.layout import fold_dir
from autoseg.network import build_network
from autoseg.phantom import generate_case

REPO = Path(__file__).resolve().parents[1]
DATASET = "Dataset501_Tiny"
POSTPROCESSING = {"largest_component_foreground": False, "largest_component_labels": [1, 3]}


def tiny_model(results: Path, seed: int = 0) -> Path:
    """A trained-dataset folder (plans, dataset.json, fold 0 weights, inference_plan.json with postprocessing) whose
    network is a 3-stage U-Net of 4-16 features with seeded random weights: deterministic labels in well under a
    second per small phantom case."""
    plans = json.loads((REPO / "plans" / "demo_phantom.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    cfg.update(spacing=[12.0, 9.0, 9.0], patch_size=[24, 48, 48], batch_size=2)  # one tile per case
    cfg["network"].update(strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], kernel_sizes=[[3, 3, 3]] * 3, features=[4, 8, 16])
    plans["configurations"] = {"3d_fullres": cfg}
    plans["normalization"][0].update(clip=[-200.0, 250.0], mean=50.0, std=60.0)
    meta = {"channel_names": {"0": "CT"}, "labels": DEFAULT_LABELS, "numTraining": 1, "file_ending": ".nii.gz"}
    ds = results / DATASET
    config_dir = ds / "3d_fullres"
    config_dir.mkdir(parents=True)
    (config_dir / "plans.json").write_text(json.dumps(plans))
    (config_dir / "dataset.json").write_text(json.dumps(meta))
    torch.manual_seed(seed)
    net = build_network(cfg, 1, len(DEFAULT_LABELS))
    save_checkpoint(fold_dir(config_dir, "0"), "final", net)
    (ds / "inference_plan.json").write_text(json.dumps(
        {"configurations": ["3d_fullres"], "folds": {"3d_fullres": ["0"]}, "postprocessing": POSTPROCESSING}))
    return ds


def right_handed_case(seed: int = 3) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """A small phantom case (int16 HU, labels, geometry) whose direction has a positive determinant."""
    image, label, geo = generate_case(seed, "small")
    d = np.asarray(geo.direction).reshape(3, 3)
    if np.linalg.det(d) < 0:  # flipped z: flip the array back and keep the direction's in-plane axes
        image, label = image[::-1].copy(), label[::-1].copy()
        d[:, 2] *= -1
        origin = np.asarray(geo.origin) - d[:, 2] * geo.spacing[2] * (geo.shape[0] - 1)
        geo = Geometry(geo.spacing, tuple(origin.tolist()), tuple(d.ravel().tolist()), geo.shape)
    return image, label, geo
