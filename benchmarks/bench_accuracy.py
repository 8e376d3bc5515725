"""Accuracy against training minutes on the demo phantom: Dice per structure and lesion recall, per configuration.

For each configuration and each budget, a fresh model is trained on the demo's 24 training cases with
``autoseg train -f all --time-budget MIN`` (everything else self-configured: precision, optimizer, schedule), the 8
held-out test cases are predicted and evaluated. A cascade's budget covers both stages: its low-resolution stage
gets ``STAGE1_SHARE`` of the minutes. Recorded per run: Dice per structure, lesion recall (IoU > 0.5) for lesions
>= 10 mm and < 10 mm, iterations done, the precision chosen, the device and the CPU model.

On a shared machine, ``--rate CONFIG=ITERS_PER_MIN`` trains that configuration for the iterations its budget holds
at a rate measured alone on the same machine (``--epochs`` instead of ``--time-budget``; the schedule is chosen from
the same iteration count either way), so other jobs slow the run down without changing its result.

Run: ``python benchmarks/bench_accuracy.py [--minutes 5 10 20] [-c 3d_fullres 3d_cascade] [--rate 3d_fullres=88]``;
prints a table, writes ``benchmarks/out/accuracy.json`` (rows of earlier runs at other budgets are kept) and
``accuracy.png``. It takes the sum of the minutes per configuration, plus a few minutes of prediction each: run it
alone on the machine unless every configuration has a ``--rate``.
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
from common import OUT, autoseg, machine, report  # noqa: E402

NAME = "Dataset501_AbdomenPhantom"
STAGE1_SHARE = 1 / 3
ITERS_PER_EPOCH = 25
STRUCTURES = ("liver", "kidney", "liver_tumor", "kidney_tumor")




def train_stage(configuration: str, minutes: float, env: dict, results: Path, log: Path, rates: dict) -> dict:
    length = (["--epochs", str(max(1, round(minutes * rates[configuration] / ITERS_PER_EPOCH)))]
              if configuration in rates else ["--time-budget", f"{minutes:g}"])
    autoseg(["train", "-d", NAME, "-c", configuration, "-f", "all", *length,
             "--iters-per-epoch", str(ITERS_PER_EPOCH), "--val-iters", "4", "--no-validation"], env, log)
    fold = results / NAME / configuration / "fold_all"
    setup = json.loads((fold / "training_setup.json").read_text())
    last = [json.loads(line) for line in (fold / "log.jsonl").read_text().splitlines()][-1]
    return {"iterations": last["iterations"], "precision": setup["precision"]["mode"]
            + ("+channels_last" if setup["precision"]["channels_last"] else ""),
            "optimizer": setup["schedule"]["optimizer"], "device": setup["estimate"]["device"], "train_s": round(sum(
                json.loads(line)["epoch_s"] for line in (fold / "log.jsonl").read_text().splitlines()), 1)}


def run(configuration: str, minutes: float, work: Path, env: dict, plans: dict, rates: dict) -> dict:
    results = work / f"results_{configuration}_{minutes:g}"
    env = {**env, "AUTOSEG_RESULTS": str(results)}
    log = work / f"{configuration}_{minutes:g}.log"
    previous = plans["configurations"][configuration].get("previous_stage")
    row: dict = {"configuration": configuration, "minutes": minutes,
                 "length": "iterations at a measured rate" if configuration in rates else "time budget"}
    if previous:
        stage1 = train_stage(previous, minutes * STAGE1_SHARE, env, results, log, rates)
        row["stage1_iterations"] = stage1["iterations"]
        minutes_2 = minutes * (1 - STAGE1_SHARE)
    else:
        minutes_2 = minutes
    row.update(train_stage(configuration, minutes_2, env, results, log, rates))
    pred, evaluation = work / f"pred_{configuration}_{minutes:g}", work / f"eval_{configuration}_{minutes:g}"
    raw = work / "raw" / NAME
    t = time.perf_counter()
    autoseg(["predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", NAME, "-c", configuration], env, log)
    row["predict_s_per_case"] = round((time.perf_counter() - t) / len(list((raw / "imagesTs").iterdir())), 1)
    autoseg(["evaluate", "-ref", str(raw / "labelsTs"), "-pred", str(pred), "-d", NAME, "-o", str(evaluation)], env, log)
    summary = json.loads((evaluation / "summary.json").read_text())
    for s in STRUCTURES:
        value = summary["structures"].get(s, {}).get("dice_mean")
        row[f"{s}_dice"] = None if value is None else round(value, 3)
    for tumour in ("liver_tumor", "kidney_tumor"):
        lesions = summary.get("lesion_detection", {}).get(tumour, {})
        for size in (">=10mm", "<10mm"):
            d, a = lesions.get("iou", {}).get(size, {}), lesions.get("any", {}).get(size, {})
            row[f"{tumour}_recall_{size}"] = None if d.get("recall") is None else round(d["recall"], 3)
            row[f"{tumour}_recall_any_{size}"] = None if a.get("recall") is None else round(a["recall"], 3)
            row[f"{tumour}_n_{size}"] = d.get("n_reference", 0)
        precision = lesions.get("any", {}).get("all", {}).get("precision")  # found lesions that are real
        row[f"{tumour}_precision_any"] = None if precision is None else round(precision, 3)
    return row


def merged(rows: list[dict], path: Path) -> list[dict]:
    """``rows`` plus the rows of an earlier run in ``path`` at other (configuration, minutes), from the same CPU."""
    try:
        earlier = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        return rows
    done = {(r["configuration"], r["minutes"]) for r in rows}
    cpu = machine()["cpu"]
    kept = [r for r in earlier if isinstance(r, dict) and r.get("cpu") == cpu
            and (r.get("configuration"), r.get("minutes")) not in done]
    return sorted(kept + rows, key=lambda r: (r["configuration"], r["minutes"]))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    for config in sorted({r["configuration"] for r in rows}):
        rs = sorted((r for r in rows if r["configuration"] == config), key=lambda r: r["minutes"])
        m = [r["minutes"] for r in rs]
        for s, style in zip(STRUCTURES, ("-", "--", "-.", ":")):
            ax[0].plot(m, [r[f"{s}_dice"] or 0 for r in rs], style, marker="o", label=f"{config} {s}")
        for t, style in zip(("liver_tumor", "kidney_tumor"), ("-", "--")):
            ax[1].plot(m, [r[f"{t}_recall_>=10mm"] or 0 for r in rs], style, marker="o", label=f"{config} {t} >= 10 mm")
            ax[1].plot(m, [r[f"{t}_recall_<10mm"] or 0 for r in rs], style, marker="x", label=f"{config} {t} < 10 mm")
    ax[0].set(xlabel="training minutes", ylabel="Dice (test cases)", ylim=(0, 1))
    ax[1].set(xlabel="training minutes", ylabel="lesion recall (IoU > 0.5)", ylim=(0, 1))
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=6)
    fig.suptitle(f"demo phantom, {machine().get('cpu', '')}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, nargs="+", default=[5, 10, 20], help="training budgets (default 5 10 20)")
    p.add_argument("-c", "--configurations", nargs="+", default=["3d_fullres", "3d_cascade"],
                   help="configurations to compare (default 3d_fullres 3d_cascade; one not planned is skipped)")
    p.add_argument("--rate", action="append", default=[], metavar="CONFIG=ITERS_PER_MIN",
                   help="train CONFIG for the iterations its budget holds at this rate (measured alone on this "
                        "machine) instead of by wall time; repeat per configuration (a cascade's stages separately)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (printed) for inspection")
    args = p.parse_args()
    rates = {}
    for item in args.rate:
        config, _, value = item.partition("=")
        try:
            rates[config] = float(value)
        except ValueError:
            p.error(f"--rate {item!r}: give CONFIG=ITERS_PER_MIN, e.g. 3d_fullres=88")
        if not rates[config] > 0:
            p.error(f"--rate {item!r}: the rate must be positive")
    work = Path(tempfile.mkdtemp(prefix="autoseg-bench-accuracy-"))
    env = {**os.environ, "AUTOSEG_RAW": str(work / "raw"), "AUTOSEG_PREPROCESSED": str(work / "pp")}
    try:
        log = work / "prepare.log"
        autoseg(["phantom", "-o", str(work / "raw"), "--cases", "24", "--test-cases", "8", "--size", "demo",
                 "--seed", "0", "--name", NAME], env, log)
        autoseg(["plan_and_preprocess", "-d", NAME, "-np", "2"], env, log)
        plans = json.loads((work / "pp" / NAME / "plans.json").read_text())
        rows = []
        for config in args.configurations:
            if config not in plans["configurations"]:
                print(f"{config}: not planned for this dataset, skipped", flush=True)
                continue
            for minutes in args.minutes:
                row = {**run(config, minutes, work, env, plans, rates), "cpu": machine()["cpu"]}
                rows.append(row)
                print(row, flush=True)
        OUT.mkdir(parents=True, exist_ok=True)
        rows = merged(rows, OUT / "accuracy.json")
        report("accuracy", rows, ["configuration", "minutes", "iterations", "precision", "optimizer",
                                  *[f"{s}_dice" for s in STRUCTURES], "liver_tumor_recall_>=10mm",
                                  "liver_tumor_recall_<10mm", "kidney_tumor_recall_>=10mm", "kidney_tumor_recall_<10mm",
                                  "predict_s_per_case"])
        plot(rows, OUT / "accuracy.png")
        print(f"curve: {OUT / 'accuracy.png'}")
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
