"""Cases per minute of `autoseg predict` in one process versus on an embedded Ray (`--cluster local`), same folder.

A random-weight 3-stage network of 4-16 features at 12x9x9 mm (one tile per case; the speed does not depend on the
weights) predicts ``--cases`` small phantom volumes with mirroring in float32 (a fixed precision, so every row
computes the same thing and the outputs can be compared byte for byte). Rows: one process; Ray with 1 worker
(actor) holding every CPU; Ray with one worker per CPU; in ``--rounds`` interleaved rounds (rotated order), each
row keeping its fastest round (load on a shared machine only adds time).

Figures per row: the start of the embedded Ray itself; seconds for the cases (for Ray from the call to the last
output, the workers' start and model load included, as the one-process run includes its model load); cases per
minute; and the overhead per case against the one-process run (the difference over the cases: what a short run
pays). Writes benchmarks/out/bench_cluster.json.

    python benchmarks/bench_cluster.py [--cases 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402

import torch  # noqa: E402

from autoseg import pipeline  # noqa: E402
from autoseg.checkpoint import save_checkpoint  # noqa: E402
from autoseg.cluster import open_cluster  # noqa: E402
from autoseg.io.images import write_image  # noqa: E402
from autoseg.labels import DEFAULT_LABELS  # noqa: E402
from autoseg.layout import Roots, fold_dir  # noqa: E402
from autoseg.network import build_network  # noqa: E402
from autoseg.phantom import generate_case  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NAME = "Dataset903_BenchCluster"


def model(results: Path) -> None:
    plans = json.loads((REPO / "plans" / "demo_phantom.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    cfg.update(spacing=[12.0, 9.0, 9.0], patch_size=[24, 48, 48], batch_size=2)  # one tile per case
    cfg["network"].update(strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], kernel_sizes=[[3, 3, 3]] * 3, features=[4, 8, 16])
    plans["configurations"] = {"3d_fullres": cfg}
    meta = {"channel_names": {"0": "CT"}, "labels": DEFAULT_LABELS, "numTraining": 1, "file_ending": ".nii.gz"}
    folder = results / NAME / "3d_fullres"
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(meta))
    torch.manual_seed(0)
    save_checkpoint(fold_dir(folder, "0"), "final", build_network(cfg, 1, len(DEFAULT_LABELS)))


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def dispatch(n: int) -> None:
    """Seconds per item of Ray itself: no-op items as tasks (:meth:`Cluster.map`) and through 2 actors
    (:meth:`Cluster.map_with`, which starts its actors at every call): (time for ``n`` - time for 2) / (n - 2), so the
    start-up cancels out; also the fixed cost of a call (2 items)."""
    rows = []
    with open_cluster("local", num_cpus=os.cpu_count() or 1) as cluster:
        for name, run in (("tasks (plan_and_preprocess)", lambda k: cluster.map(abs, range(k), progress=False)),
                          ("2 actors (predict)", lambda k: cluster.map_with(dict, dict.get, range(k), 2,
                                                                          progress=False))):
            run(2)  # warm-up: Ray's first worker processes
            t0 = time.perf_counter()
            run(2)
            fixed = time.perf_counter() - t0
            t0 = time.perf_counter()
            run(n)
            per_item = (time.perf_counter() - t0 - fixed) / (n - 2)
            rows.append({"mapping": name, "items": n, "call_with_2_items_s": round(fixed, 2),
                         "s_per_item": round(per_item, 4)})
    report("bench_cluster_dispatch", rows, ["mapping", "items", "call_with_2_items_s", "s_per_item"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=8, help="phantom volumes to predict (default 8)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="interleaved rounds; each row keeps its fastest (load on a shared machine only adds time)")
    ap.add_argument("--dispatch", type=int, default=50,
                    help="no-op items for the engine's own cost per item (0: skip)")
    ap.add_argument("--dispatch-only", action="store_true", help="measure only the cost per item")
    args = ap.parse_args()
    if args.dispatch:
        dispatch(args.dispatch)
    if args.dispatch_only:
        return
    cpus = os.cpu_count() or 1
    runs = [None] + sorted({1, cpus})  # None: one process; else Ray workers
    best: dict[int | None, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        roots = Roots(tmp / "raw", tmp / "pre", tmp / "results")
        model(roots.results)
        for i in range(args.cases):
            image, _, geo = generate_case(200 + i, "small")
            write_image(tmp / "in" / f"case_{i:03d}_0000.nii.gz", image, geo)
        settings = dict(dataset=NAME, device="cpu", precision="fp32")
        reference = None
        for r in range(args.rounds):
            for workers in runs[r % len(runs):] + runs[:r % len(runs)]:  # rotate the order: drifting load is shared
                out = tmp / f"r{r}_{workers}"
                start = 0.0
                t0 = time.perf_counter()
                if workers is None:
                    pipeline.predict(roots, tmp / "in", out, **settings)
                else:
                    with open_cluster("local", num_cpus=cpus):
                        start = time.perf_counter() - t0
                        t0 = time.perf_counter()
                        pipeline.predict(roots, tmp / "in", out, cluster="local", cluster_workers=workers, **settings)
                run = time.perf_counter() - t0
                reference = reference or files(out)
                row = best.setdefault(workers, {"cases_s": [], "startup_s": [], "identical": True})
                row["cases_s"].append(round(run, 1))
                row["startup_s"].append(round(start, 1))
                row["identical"] &= files(out) == reference
    single = min(best[None]["cases_s"])
    rows = []
    for workers in runs:
        b = best[workers]
        fastest = min(b["cases_s"])
        name = "one process" if workers is None else f"Ray local, {workers} worker(s) x {cpus // workers} CPU"
        rows.append({"run": name,
                     "ray_start_s": "-" if workers is None else min(b["startup_s"]), "cases_s": fastest,
                     "rounds_s": b["cases_s"], "cases_per_min": round(args.cases / fastest * 60, 1),
                     "overhead_per_case_s": round((fastest - single) / args.cases, 2), "identical": b["identical"]})
    report("bench_cluster", rows, ["run", "ray_start_s", "cases_s", "rounds_s", "cases_per_min",
                                   "overhead_per_case_s", "identical"])


if __name__ == "__main__":
    main()
