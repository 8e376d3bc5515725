"""plan_and_preprocess on a fixed phantom dataset (30 cases, about 128x128x80), against nnU-Net v2's figure.

nnU-Net v2.8.1 on this machine kind (2 cores), same-sized data: 70 s wall and 1.9 GB peak RSS for 30 cases
(shared/reference/peer_figures.md). Target: at least 3x faster, at most half the peak RAM.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report, run_measured  # noqa: E402

from autoseg.phantom import write_dataset  # noqa: E402

NNUNET = {"wall_s": 70.0, "peak_rss_gb": 1.9}
CASES = 30


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="autoseg-bench-pp-"))
    try:
        write_dataset(work / "raw", CASES, seed=123, size="bench", dataset_name="Dataset900_Bench")
        env = dict(os.environ, AUTOSEG_RAW=str(work / "raw"), AUTOSEG_PREPROCESSED=str(work / "pp"))
        exe = str(Path(sys.executable).with_name("autoseg"))
        m = run_measured([exe, "plan_and_preprocess", "-d", "900", "-np", "2"], env=env)
        rows = [
            {
                "step": "plan_and_preprocess -np 2 (2d + 3d_fullres)",
                "cases": CASES,
                "wall_s": m["wall_s"],
                "cases_per_s": round(CASES / m["wall_s"], 2),
                "peak_rss_gb": m["peak_rss_gb"],
                "nnunet_wall_s": NNUNET["wall_s"],
                "nnunet_peak_rss_gb": NNUNET["peak_rss_gb"],
                "speedup": round(NNUNET["wall_s"] / m["wall_s"], 2),
                "ram_ratio": round(m["peak_rss_gb"] / NNUNET["peak_rss_gb"], 2),
            }
        ]
        report("preprocess", rows, list(rows[0]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
