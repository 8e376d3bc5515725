"""Lesion-aware sampling against voxel sampling: lesion recall by size at equal training iterations.

The ablation keeps everything else equal (data, seed, class shares with tumour classes weighted twice, random
share, schedule, iterations) and changes one step of :mod:`autoseg.training.sampling`: after a class is drawn, the
patch centre is either a voxel of a connected component drawn uniformly over the components (``component``, what
autoseg trains with) or a voxel drawn uniformly over all of the class's voxels (``voxel``, nnU-Net's foreground
oversampling), so a lesion is drawn in proportion to its volume.

Equal iterations, not equal minutes, so the comparison survives a shared machine: both arms cost the same per
iteration. Training uses the demo's 24 cases (seed 0); a separate held-out set (seed 1, 24 cases, more lesions
than the demo's 8) is scored, recall per size bin (IoU > 0.5, and any overlap) and Dice.

Run: ``python benchmarks/bench_sampling.py [--iterations 1000] [--arms component voxel]``; about 15 minutes per
arm on 2 CPU cores. Writes ``benchmarks/out/sampling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_accuracy import NAME, STRUCTURES, autoseg  # noqa: E402
from common import OUT, machine, report  # noqa: E402

ITERS_PER_EPOCH = 25
# The `voxel` arm: the same trainer with the component step replaced by a uniform voxel of the class.
VOXEL_ARM = (
    "import numpy as np, sys\n"
    "import autoseg.training.data as d\n"
    "d.pick_voxel = lambda coords, comp, component, rng: coords[int(rng.integers(len(coords)))].astype(np.int64)\n"
    "from autoseg.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
BINS = ("<10mm", "10-20mm", ">20mm", "all")


def train(arm: str, iterations: int, env: dict, log: Path) -> float:
    args = ["train", "-d", NAME, "-c", "3d_fullres", "-f", "all", "--epochs", str(max(1, iterations // ITERS_PER_EPOCH)),
            "--iters-per-epoch", str(ITERS_PER_EPOCH), "--val-iters", "4", "--no-validation"]
    t = time.perf_counter()
    if arm == "component":
        autoseg(args, env, log)
    else:
        import subprocess

        with open(log, "a") as f:
            f.write(f"\n$ (voxel sampling) autoseg {' '.join(args)}\n")
            f.flush()
            proc = subprocess.run([sys.executable, "-c", VOXEL_ARM, *args], env=env, stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise SystemExit(f"voxel arm training failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - t


def score(summary: dict) -> dict:
    row: dict = {}
    for s in STRUCTURES:
        value = summary["structures"].get(s, {}).get("dice_mean")
        row[f"{s}_dice"] = None if value is None else round(value, 3)
    for tumour in ("liver_tumor", "kidney_tumor"):
        det = summary.get("lesion_detection", {}).get(tumour, {})
        for b in BINS:
            for match in ("iou", "any"):
                d = det.get(match, {}).get(b, {})
                row[f"{tumour}_{match}_{b}"] = f"{d.get('n_detected', 0)}/{d.get('n_reference', 0)}"
        row[f"{tumour}_fp"] = det.get("false_positives")
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=1000, help="training iterations per arm (default 1000)")
    p.add_argument("--arms", nargs="+", choices=("component", "voxel"), default=["component", "voxel"],
                   help="sampling arms to train (default both)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (printed) for inspection")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="autoseg-bench-sampling-"))
    env = {**os.environ, "AUTOSEG_RAW": str(work / "raw"), "AUTOSEG_PREPROCESSED": str(work / "pp")}
    try:
        log = work / "prepare.log"
        autoseg(["phantom", "-o", str(work / "raw"), "--cases", "24", "--size", "demo", "--seed", "0", "--name", NAME],
                env, log)
        autoseg(["phantom", "-o", str(work / "heldout"), "--cases", "1", "--test-cases", "24", "--size", "demo",
                 "--seed", "1", "--name", NAME], env, log)
        autoseg(["plan_and_preprocess", "-d", NAME, "-np", "2"], env, log)
        test = work / "heldout" / NAME
        rows = []
        for arm in args.arms:
            run_env = {**env, "AUTOSEG_RESULTS": str(work / f"results_{arm}")}
            alog = work / f"{arm}.log"
            train_s = train(arm, args.iterations, run_env, alog)
            pred, ev = work / f"pred_{arm}", work / f"eval_{arm}"
            autoseg(["predict", "-i", str(test / "imagesTs"), "-o", str(pred), "-d", NAME, "-c", "3d_fullres"],
                    run_env, alog)
            autoseg(["evaluate", "-ref", str(test / "labelsTs"), "-pred", str(pred), "-d", NAME, "-o", str(ev)],
                    run_env, alog)
            row = {"arm": arm, "iterations": args.iterations, "train_s": round(train_s, 1),
                   **score(json.loads((ev / "summary.json").read_text())), "cpu": machine()["cpu"]}
            rows.append(row)
            print(row, flush=True)
        OUT.mkdir(parents=True, exist_ok=True)
        report("sampling", rows, ["arm", "iterations", *[f"{s}_dice" for s in STRUCTURES],
                                  *[f"{t}_iou_{b}" for t in ("liver_tumor", "kidney_tumor") for b in BINS],
                                  "liver_tumor_fp", "kidney_tumor_fp"])
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
