"""The demo phantom's tumour contrast, noise and lesion sizes, beside the figures of one real portal-venous liver CT.

Why: the phantom must not be easier than real CT. Measured on the phantom's own label maps (no model involved):
- organ and lesion HU: mean and standard deviation over all voxels of the label;
- lesion contrast: per lesion component, mean HU of the organ in a 2-voxel shell around it minus the lesion's
  mean (positive = hypodense), summarised over lesions;
- noise: standard deviation of the high-pass image (image minus its 3x3x3 mean) inside the organ eroded by two
  voxels, scaled by sqrt(27/26) so that white noise of sigma s reads s;
- lesion component volumes in mL.

Run: ``python benchmarks/phantom_stats.py [--cases 24] [--size demo]``; prints a table, writes
``benchmarks/out/phantom_stats.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, machine  # noqa: E402

from autoseg.labels import DEFAULT_LABELS as LABELS
from autoseg.phantom import case_seed, generate_case  # noqa: E402

REAL = {  # one real portal-venous liver CT with manual labels (issue: "Honest data")
    "liver_hu": "118 +- 22",
    "lesion_hu": "70 +- 23",
    "contrast_hu": "about 48",
    "noise_sigma_hu": "about 14 (high-pass)",
    "lesions": "79 components, under 0.1 mL to tens of mL",
}
ORGANS = {"liver_tumor": "liver", "kidney_tumor": "kidney"}


def case_stats(img: np.ndarray, lab: np.ndarray, spacing_xyz: tuple[float, ...]) -> dict[str, list[float]]:
    img = img.astype(np.float32)
    voxel_ml = float(np.prod(spacing_xyz)) / 1000.0
    out: dict[str, list[float]] = {}
    hp = img - ndimage.uniform_filter(img, size=3, mode="nearest")
    for tumour, organ in ORGANS.items():
        t, o = LABELS[tumour], LABELS[organ]
        organ_mask = lab == o
        if organ_mask.any():
            out.setdefault(f"{organ}_hu", []).extend(img[organ_mask][::7].tolist())
            core = ndimage.binary_erosion(organ_mask, iterations=2)
            if core.sum() > 100:
                out.setdefault(f"{organ}_noise", []).append(float(hp[core].std() * np.sqrt(27 / 26)))
        comps, n = ndimage.label(lab == t, structure=np.ones((3, 3, 3)))
        for i in range(1, n + 1):
            m = comps == i
            shell = ndimage.binary_dilation(m, iterations=2) & ~m & organ_mask
            out.setdefault(f"{tumour}_hu", []).extend(img[m].tolist())
            out.setdefault(f"{tumour}_ml", []).append(float(m.sum() * voxel_ml))
            if shell.sum() >= 10:
                out.setdefault(f"{tumour}_contrast", []).append(float(img[shell].mean() - img[m].mean()))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=24, help="phantom cases to measure (default 24, the demo's)")
    p.add_argument("--size", default="demo", help="phantom size preset (default demo)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0, the demo's)")
    args = p.parse_args()
    pooled: dict[str, list[float]] = {}
    for i in range(args.cases):
        img, lab, geo = generate_case(case_seed(args.seed, i), args.size)
        for k, v in case_stats(img, lab, geo.spacing).items():
            pooled.setdefault(k, []).extend(v)
    rows = {}
    for k, v in sorted(pooled.items()):
        a = np.asarray(v)
        rows[k] = {"n": int(a.size), "mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()),
                   "median": float(np.median(a)), "max": float(a.max())}
    contrast = np.asarray(pooled.get("liver_tumor_contrast", [np.nan]))
    rows["liver_tumor_hypodense_share"] = float(np.mean(contrast > 0))
    print(f"phantom '{args.size}', {args.cases} cases, seed {args.seed}")
    print(f"{'quantity':<24}{'n':>7}{'mean':>9}{'std':>8}{'min':>9}{'median':>9}{'max':>9}")
    for k, r in rows.items():
        if isinstance(r, dict):
            print(f"{k:<24}{r['n']:>7}{r['mean']:>9.2f}{r['std']:>8.2f}{r['min']:>9.2f}{r['median']:>9.2f}{r['max']:>9.2f}")
    print(f"liver lesions hypodense: {rows['liver_tumor_hypodense_share']:.2f}")
    print("real portal-venous liver CT: " + "; ".join(f"{k} {v}" for k, v in REAL.items()))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "phantom_stats.json").write_text(json.dumps({"machine": machine(), "args": vars(args), "phantom": rows,
                                                         "real": REAL}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
