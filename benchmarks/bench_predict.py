"""Seconds per case and peak RSS for `autoseg predict` on ~256x256x150 phantom volumes.

Networks have random weights (speed does not depend on them). Rows:
- the GPU plan's network (nnU-Net-sized: 32 base features, 6 stages), `--no-tta`, step 0.5: the setting of
  nnU-Net v2's 105 s per case (`nnUNetv2_predict --disable_tta`, 256x256x29-300 volumes, 2 CPU cores,
  shared/reference/peer_figures.md);
- the same with `--fast` (one fold, no mirroring, step 0.75);
- the CPU plan's network (what autoseg trains on a CPU): default (mirroring, `--precision auto`), the same in
  float32 (`--precision fp32`, the default before precision was measured) and `--fast`.
Peak RSS is the whole process tree's.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report, run_measured  # noqa: E402

from autoseg.atomic import write_json  # noqa: E402
from autoseg.cli import main as cli  # noqa: E402
from autoseg.network import build_network  # noqa: E402
from autoseg.phantom import write_dataset  # noqa: E402
from autoseg.planning.planner import plan  # noqa: E402
from autoseg.checkpoint import save_checkpoint  # noqa: E402

NAME = "Dataset902_BenchPredict"
NNUNET_NO_TTA_S = 105.0
NNUNET_NO_TTA_RSS_GB = 3.51
CASES = 1  # test volumes predicted per row (the GPU-plan network takes minutes per case on 2 cores)


def fake_model(results: Path, plans: dict, meta: dict) -> None:
    """A results folder with a random-weight fold 0 for 3d_fullres."""
    folder = results / NAME / "3d_fullres"
    write_json(folder / "plans.json", plans)
    write_json(folder / "dataset.json", meta)
    net = build_network(plans["configurations"]["3d_fullres"], 1, 5)
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder / "fold_0", "final", net)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="autoseg-bench-predict-"))
    try:
        env = dict(os.environ, AUTOSEG_RAW=str(work / "raw"), AUTOSEG_PREPROCESSED=str(work / "pp"))
        os.environ.update(env)
        raw = write_dataset(work / "raw", 2, seed=99, size="large", num_test=CASES, dataset_name=NAME)
        assert cli(["plan_and_preprocess", "-d", NAME, "-c", "3d_fullres", "-np", "2", "--device", "gpu"]) == 0
        fingerprint = json.loads((work / "pp" / NAME / "fingerprint.json").read_text())
        meta = json.loads((raw / "dataset.json").read_text())
        exe = str(Path(sys.executable).with_name("autoseg"))
        rows = []
        for target, runs in (("gpu", [("--no-tta", ["--no-tta"]), ("--fast", ["--fast"])]),
                             ("cpu", [("default (mirroring, precision auto)", []),
                                      ("mirroring, --precision fp32", ["--precision", "fp32"]),
                                      ("--fast", ["--fast"])])):
            plans = plan(fingerprint, device=target)
            results = work / f"results_{target}"
            fake_model(results, plans, meta)
            cfg = plans["configurations"]["3d_fullres"]
            for label, flags in runs:
                out = work / f"pred_{target}_{len(rows)}"
                m = run_measured([exe, "predict", "-i", str(raw / "imagesTs"), "-o", str(out), "-d", NAME,
                                  "-c", "3d_fullres", "--device", "cpu", *flags],
                                 env=dict(env, AUTOSEG_RESULTS=str(results)))
                row = {"plan": target, "settings": label, "patch": "x".join(map(str, cfg["patch_size"])),
                       "features": cfg["network"]["features"][0], "s_per_case": round(m["wall_s"] / CASES, 1),
                       "peak_rss_gb": m["peak_rss_gb"]}
                if target == "gpu" and label == "--no-tta":
                    row["nnunet_s_per_case"] = NNUNET_NO_TTA_S
                    row["speedup_vs_nnunet"] = round(NNUNET_NO_TTA_S / row["s_per_case"], 2)
                    row["nnunet_peak_rss_gb"] = NNUNET_NO_TTA_RSS_GB
                rows.append(row)
                print(row, flush=True)
        report("predict", rows, ["plan", "settings", "patch", "features", "s_per_case", "peak_rss_gb",
                                 "nnunet_s_per_case", "speedup_vs_nnunet", "nnunet_peak_rss_gb"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
