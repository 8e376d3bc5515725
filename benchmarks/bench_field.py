"""Issue 14 figures: DICOM series read time against the NIfTI of the same volume, end-to-end seconds of
``autoseg.segment`` on a demo-size phantom case, and the KiTS surface Dice against surface-distance's own test values.

The segment timing uses the demo's CPU plan (``autoseg plan --device cpu`` on ``fingerprints/demo_phantom.json``) with
seeded random weights: the compute is that of the trained demo model, the labels are meaningless.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import autoseg  # noqa: E402
from autoseg.checkpoint import save_checkpoint  # noqa: E402
from autoseg.evaluation.kits import area_surface_dice  # noqa: E402
from autoseg.evaluation.metrics import binary_metrics  # noqa: E402
from autoseg.io.dicom import find_series, read_series, write_series  # noqa: E402
from autoseg.io.images import Geometry, read_image, write_image  # noqa: E402
from autoseg.labels import DEFAULT_LABELS  # noqa: E402
from autoseg.layout import fold_dir  # noqa: E402
from autoseg.network import build_network  # noqa: E402
from autoseg.phantom import generate_case  # noqa: E402
from common import best_of, machine, report  # noqa: E402




def _demo_model(root: Path) -> Path:
    plans_path = root / "plans.json"
    subprocess.run([sys.executable, "-m", "autoseg", "plan", "--device", "cpu", "-f",
                    str(HERE.parent / "fingerprints" / "demo_phantom.json"), "-o", str(plans_path)],
                   check=True, capture_output=True)
    plans = json.loads(plans_path.read_text())
    cfg_dir = root / "Dataset501_AbdomenPhantom" / "3d_fullres"
    cfg_dir.mkdir(parents=True)
    plans_path.rename(cfg_dir / "plans.json")
    (cfg_dir / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": DEFAULT_LABELS,
                                                      "numTraining": 24, "file_ending": ".nii.gz"}))
    torch.manual_seed(0)
    net = build_network(plans["configurations"]["3d_fullres"], 1, len(DEFAULT_LABELS))
    save_checkpoint(fold_dir(cfg_dir, "0"), "final", net)
    return cfg_dir.parent


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image, _, geo = generate_case(0, "demo")
        d = np.asarray(geo.direction).reshape(3, 3)
        if np.linalg.det(d) < 0:
            image, d[:, 2] = image[::-1].copy(), -d[:, 2]
            geo = Geometry(geo.spacing, geo.origin, tuple(d.ravel().tolist()), geo.shape)
        write_image(tmp / "ct.nii.gz", image, geo)
        write_series(tmp / "series", image, geo, "1.2.826.0.1.3680043.8.498.7")
        series = find_series(tmp / "series")[0]
        t_nifti = best_of(lambda: read_image(tmp / "ct.nii.gz"), 5)
        t_dicom = best_of(lambda: read_series(series), 5)
        t_find = best_of(lambda: find_series(tmp / "series"), 5)
        shape = "x".join(map(str, geo.shape))
        rows.append({"measure": f"read NIfTI .nii.gz ({shape})", "value": round(t_nifti, 3), "unit": "s"})
        rows.append({"measure": f"read DICOM series, checked ({len(series.files)} slices)", "value": round(t_dicom, 3),
                     "unit": "s"})
        rows.append({"measure": "find DICOM series in folder", "value": round(t_find, 3), "unit": "s"})

        model = autoseg.load_model(_demo_model(tmp), device="cpu")
        t0 = time.perf_counter()
        model.segment(tmp / "ct.nii.gz")
        rows.append({"measure": f"autoseg.segment demo case, 1 fold, mirroring, step 0.5 ({shape})",
                     "value": round(time.perf_counter() - t0, 1), "unit": "s"})
        t0 = time.perf_counter()
        autoseg.segment(tmp / "series", model=model)
        rows.append({"measure": "autoseg.segment, same case from its DICOM series", "value":
                     round(time.perf_counter() - t0, 1), "unit": "s"})

    ref = np.zeros((100, 100, 100), bool)
    pred = np.zeros_like(ref)
    ref[:50], pred[:51] = True, True
    rows.append({"measure": "KiTS surface Dice, two cubes 1 slice apart, (2,1,1) mm, 1 mm (library: 0.836)",
                 "value": round(area_surface_dice(pred, ref, (2, 1, 1), 1.0), 4), "unit": ""})
    rows.append({"measure": "autoseg voxel-count surface Dice, same masks", "value":
                 round(binary_metrics(pred, ref, (2, 1, 1), 1.0)["surface_dice"], 4), "unit": ""})
    a, b = np.zeros((12, 12, 12), bool), np.zeros((12, 12, 12), bool)
    a[5, 6, 6], b[5, 6, 8] = True, True
    rows.append({"measure": "KiTS surface Dice, two voxels 2 mm apart, (3,2,1) mm, 1 mm (library: 0.5)",
                 "value": round(area_surface_dice(b, a, (3, 2, 1), 1.0), 4), "unit": ""})
    path = report("field", rows, ["measure", "value", "unit"])
    print(json.dumps(machine()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
