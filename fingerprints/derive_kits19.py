"""One-off derivation of ``kits19.json`` from the public KiTS19 label geometry (210 cases).

Run by hand only when the source geometry or the fingerprint format changes:
    python fingerprints/derive_kits19.py PATH/TO/kits19_geometry.json > fingerprints/kits19.json
The project never reads the source file at run or test time; the derived fingerprint is committed.

Geometry (shape, spacing) and label volumes are real. KiTS19 label maps carry no intensities, so the intensity
statistics are typical contrast-enhanced CT kidney-foreground values and are marked as assumed; the planner only
copies them into the normalisation entry, they do not affect patch, spacing or topology decisions.
"""

import json
import sys

import numpy as np

ASSUMED_CT_FOREGROUND = {
    "mean": 103.0, "std": 73.0, "min": -210.0, "max": 1420.0, "median": 103.0, "p00_5": -58.0, "p99_5": 302.0,
}


def main(src: str) -> None:
    geo = json.load(open(src))
    cases = []
    totals = {"0": 0, "1": 0, "2": 0}
    for c in geo["cases"]:
        shape = [int(v) for v in c["shape_zyx"]]
        spacing = [round(float(v), 6) for v in c["spacing_zyx_mm"]]
        voxel_ml = float(np.prod(spacing)) / 1000.0
        kidney = int(round(c["kidney_ml"] / voxel_ml))
        tumour = int(round(c["tumor_ml"] / voxel_ml))
        counts = {"0": int(np.prod(shape)) - kidney - tumour, "1": kidney, "2": tumour}
        for k in totals:
            totals[k] += counts[k]
        cases.append({
            "case": c["case"], "spacing": spacing, "shape": shape, "shape_after_crop": shape,
            "class_voxels": {k: v for k, v in counts.items() if v > 0},
            "intensity": {"0": dict(ASSUMED_CT_FOREGROUND)},
        })
    spacings = np.array([c["spacing"] for c in cases])
    shapes = np.array([c["shape_after_crop"] for c in cases])
    n = sum(totals.values())
    fp = {
        "schema_version": 1,
        "autoseg_version": "reference",
        "dataset_name": "Dataset064_KiTS19",
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "kidney": 1, "kidney_tumor": 2},
        "file_ending": ".nii.gz",
        "num_cases": len(cases),
        "spacing_median": [round(float(v), 6) for v in np.percentile(spacings, 50, axis=0)],
        "spacing_p10": [round(float(v), 6) for v in np.percentile(spacings, 10, axis=0)],
        "spacing_p90": [round(float(v), 6) for v in np.percentile(spacings, 90, axis=0)],
        "shape_after_crop_median": [round(float(v), 6) for v in np.percentile(shapes, 50, axis=0)],
        "intensity": {"0": dict(ASSUMED_CT_FOREGROUND)},
        "class_fractions": {k: float(f"{v / n:.6g}") for k, v in totals.items()},
        "cases": cases,
    }
    json.dump(fp, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
