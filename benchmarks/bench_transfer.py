"""Transfer learning on a small dataset: Dice against training iterations, from scratch and ``--init-from`` a model
trained on another phantom dataset.

Target: ``--cases`` (default 6) training and ``--test-cases`` (4) held-out phantom cases of seed ``--seed``. Source:
a phantom of another seed with ``--source-cases`` cases, preprocessed with the target's plans (a model can only
start another one of the same network plan; two phantoms usually plan alike, and the script says when they do
not), trained for ``--source-iterations``. Then for each length in ``--iterations`` one run from scratch and one
``--init-from`` the source (same seed, same schedule, same data), each predicted on the test cases (``--fast``) and
evaluated. Lengths are fixed iteration counts (the CPU is shared, so time budgets would measure the neighbours);
minutes are the iterations times the seconds per iteration measured in the same runs.

``--network small`` (default) replaces the planned 3d_fullres network by a three-stage one (features 8, 16, 32)
with a 24x48x48 patch, in the target's plans before anything trains (the preprocessed data does not depend on
it): on a shared 2-core CPU the planned network (four stages, 40x56x56) costs several seconds per iteration.
``--network planned`` keeps the plan.

Run: ``nice -n 19 python benchmarks/bench_transfer.py [--iterations 25 50 100] [--source-iterations 300]``; prints a
table and writes ``benchmarks/out/transfer.json``.
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
from common import autoseg, report  # noqa: E402

NAME = "Dataset501_AbdomenPhantom"
SOURCE = "Dataset502_SourcePhantom"
ITERS_PER_EPOCH = 25
STRUCTURES = ("liver", "kidney", "liver_tumor", "kidney_tumor")
FIXED = ["--device", "cpu", "--num-workers", "0", "--precision", "fp32", "--val-iters", "2", "--no-validation"]




def epochs_for(iterations: int) -> list[str]:
    epochs = max(1, iterations // ITERS_PER_EPOCH)
    return ["--epochs", str(epochs), "--iters-per-epoch", str(iterations // epochs)]


def train(dataset: str, iterations: int, env: dict, log: Path, init_from: Path | None = None) -> dict:
    extra = ["--init-from", str(init_from)] if init_from else []
    autoseg(["train", "-d", dataset, "-f", "all", *epochs_for(iterations), *FIXED, *extra], env, log)
    fold = Path(env["AUTOSEG_RESULTS"]) / dataset / "3d_fullres" / "fold_all"
    lines = [json.loads(line) for line in (fold / "log.jsonl").read_text().splitlines()]
    setup = json.loads((fold / "training_setup.json").read_text())
    return {"iterations": lines[-1]["iterations"], "train_s": round(sum(r["epoch_s"] for r in lines), 1),
            "loaded": setup.get("init_from", {}).get("loaded"), "optimizer": setup["schedule"]["optimizer"]}


def evaluate(work: Path, tag: str, env: dict, log: Path) -> dict:
    raw = work / "raw" / NAME
    pred, out = work / f"pred_{tag}", work / f"eval_{tag}"
    autoseg(["predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", NAME, "--fast", "--device", "cpu",
             "--precision", "fp32"], env, log)
    autoseg(["evaluate", "-ref", str(raw / "labelsTs"), "-pred", str(pred), "-d", NAME, "-o", str(out)], env, log)
    summary = json.loads((out / "summary.json").read_text())
    row = {f"{s}_dice": round(summary["structures"].get(s, {}).get("dice_mean") or 0.0, 3) for s in STRUCTURES}
    row["mean_dice"] = round(sum(row[f"{s}_dice"] for s in STRUCTURES) / len(STRUCTURES), 3)
    # a test case without a tumour scores 1 for an empty prediction: the organs say more in short runs
    row["organ_mean_dice"] = round((row["liver_dice"] + row["kidney_dice"]) / 2, 3)
    return row


SMALL_NET = {"encoder": "plain", "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
             "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]], "features": [8, 16, 32], "convs_per_stage": 2,
             "deep_supervision": True}


def shrink_plans(path: Path) -> None:
    plans = json.loads(path.read_text())
    cfg = plans["configurations"]["3d_fullres"]
    cfg["patch_size"], cfg["network"] = [24, 48, 48], dict(SMALL_NET)
    cfg["notes"].append("bench_transfer: network and patch replaced by a small one")
    path.write_text(json.dumps(plans, indent=1))


def prepare_source(work: Path, env: dict, args: argparse.Namespace, log: Path) -> str:
    """The source phantom, preprocessed with its own plans when its network matches the target's, else with the
    target's plans; returns a note saying which."""
    autoseg(["phantom", "-o", str(work / "raw"), "--cases", str(args.source_cases), "--seed", str(args.seed + 1000),
             "--name", SOURCE], env, log)
    autoseg(["plan_and_preprocess", "-d", SOURCE, "-c", "3d_fullres", "-np", "1", "--device", "cpu"], env, log)
    target = json.loads((work / "preprocessed" / NAME / "plans.json").read_text())
    own = json.loads((work / "preprocessed" / SOURCE / "plans.json").read_text())
    if own["configurations"]["3d_fullres"]["network"] == target["configurations"]["3d_fullres"]["network"]:
        return "source planned by itself (same network plan as the target)"
    from autoseg.atomic import write_json
    from autoseg.io.dataset import images_in_folder, load_dataset_json
    from autoseg.preprocessing.preprocess import preprocess_dataset

    raw = work / "raw" / SOURCE
    meta = load_dataset_json(raw)
    cases, _ = images_in_folder(raw / "imagesTr", meta["file_ending"], 1, raw / "labelsTr")
    plans = {**target, "dataset_name": SOURCE}
    out = work / "preprocessed" / SOURCE
    write_json(out / "plans.json", plans)
    preprocess_dataset(cases, plans, ["3d_fullres"], out, 1)
    return "source preprocessed with the target's plans (its own plan had another network)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, nargs="+", default=[25, 50, 100], help="target run lengths")
    ap.add_argument("--source-iterations", type=int, default=300, help="iterations of the source model")
    ap.add_argument("--cases", type=int, default=6, help="target training cases (default 6)")
    ap.add_argument("--test-cases", type=int, default=4, help="target test cases (default 4)")
    ap.add_argument("--source-cases", type=int, default=12, help="source training cases (default 12)")
    ap.add_argument("--seed", type=int, default=11, help="target phantom seed; the source uses seed + 1000")
    ap.add_argument("--network", choices=["small", "planned"], default="small",
                    help="small (default): a three-stage network and 24x48x48 patch; planned: the CPU plan's")
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="autoseg-transfer-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "AUTOSEG_RAW": str(work / "raw"), "AUTOSEG_PREPROCESSED": str(work / "preprocessed")}
    print(f"work folder {work}, log {log}", flush=True)
    autoseg(["phantom", "-o", str(work / "raw"), "--cases", str(args.cases), "--test-cases", str(args.test_cases),
             "--seed", str(args.seed)], env, log)
    autoseg(["plan_and_preprocess", "-d", NAME, "-c", "3d_fullres", "-np", "1", "--device", "cpu"], env, log)
    if args.network == "small":
        shrink_plans(work / "preprocessed" / NAME / "plans.json")
    note = prepare_source(work, env, args, log)
    print(note, flush=True)
    source_env = {**env, "AUTOSEG_RESULTS": str(work / "results_source")}
    t0 = time.perf_counter()
    source = train(SOURCE, args.source_iterations, source_env, log)
    print(f"source: {source['iterations']} iterations in {source['train_s']} s", flush=True)
    rows = []
    for iterations in args.iterations:
        for arm in ("scratch", "init-from"):
            tag = f"{arm}_{iterations}"
            run_env = {**env, "AUTOSEG_RESULTS": str(work / f"results_{tag}")}
            init = work / "results_source" / SOURCE if arm == "init-from" else None
            row = {"start": arm, **train(NAME, iterations, run_env, log, init)}
            row["s_per_iteration"] = round(row["train_s"] / row["iterations"], 3)
            row.update(evaluate(work, tag, run_env, log))
            rows.append(row)
            print(row, flush=True)
    rate = sum(r["train_s"] for r in rows) / sum(r["iterations"] for r in rows)
    for r in rows:
        r["minutes_at_measured_rate"] = round(r["iterations"] * rate / 60, 2)
    rows.append({"start": "source", **source, "network": args.network, "note": note, "total_s": round(time.perf_counter() - t0, 1),
                 "load_average": os.getloadavg()[0]})
    report("transfer", rows, ["start", "iterations", "minutes_at_measured_rate", "s_per_iteration", "loaded",
                              "liver_dice", "kidney_dice", "organ_mean_dice", "liver_tumor_dice", "kidney_tumor_dice",
                              "mean_dice"])
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
