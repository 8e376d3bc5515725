"""How well ``predict --uncertainty`` knows when not to trust itself, on held-out phantom cases.

Trains ``3d_fullres`` (the CPU plan) on a small phantom for ``--minutes`` per fold, 5 folds with ``--npz``, runs
``find_best_configuration`` (which calibrates the review flag on the folds' validation cases), predicts the held-out
test cases with and without ``--uncertainty`` (wall time and peak memory of each), and measures:

* per structure, the Spearman correlation between the expected Dice and the true Dice (held-out and CV cases);
* for "a structure's Dice < 0.7": the AUROC of the expected Dice as a score, and the sensitivity / specificity of
  the calibrated flag, per structure and per case (a case is low when any structure is, flagged when any is);
* per predicted tumour lesion: the AUROC of its confidence (and of its mean probability) for separating lesions
  that overlap a reference lesion from false positives;
* the extra time and peak memory of ``--uncertainty`` (``--timing-folds``, default one fold with its 8 mirrorings:
  the extra work is per member, so the ratio holds for more folds).

AUROC is the Mann-Whitney probability that a random positive scores above a random negative (ties count one half);
it is None when a class is empty.

Run: ``python benchmarks/bench_uncertainty.py [--work DIR] [--minutes 4] [--cases 20] [--test-cases 10] [--no-tta]``.
Steps already done in ``--work`` (the phantom, trained folds, predictions) are reused, so a rerun only measures.
Writes ``benchmarks/out/uncertainty.json``. Run it niced on a shared machine; timing figures then vary with load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, report, run_measured  # noqa: E402

from autoseg.evaluation.lesions import lesion_detection  # noqa: E402
from autoseg.inference.postprocess import apply_postprocessing  # noqa: E402
from autoseg.inference.uncertainty import DICE_BELOW, expected_dice, review_decision  # noqa: E402
from autoseg.io.images import read_image, read_probabilities  # noqa: E402
from autoseg.masks import dice_per_label  # noqa: E402

NAME = "Dataset501_AbdomenPhantom"
STRUCTURES = {"1": "liver", "2": "liver_tumor", "3": "kidney", "4": "kidney_tumor"}
TUMOURS = (2, 4)


def autoseg(args: list[str], env: dict) -> None:
    subprocess.run([sys.executable, "-m", "autoseg", *args], env=env, check=True)


def auroc(positive: list[float], negative: list[float]) -> float | None:
    """P(score of a positive > score of a negative), ties one half; None without both classes."""
    if not positive or not negative:
        return None
    p, n = np.asarray(positive, float)[:, None], np.asarray(negative, float)[None, :]
    return round(float((p > n).mean() + 0.5 * (p == n).mean()), 3)


def spearman(a: list[float], b: list[float]) -> float | None:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return round(float(spearmanr(a, b).statistic), 3)


def rates(flagged: list[bool], low: list[bool]) -> dict:
    f, lo = np.asarray(flagged, bool), np.asarray(low, bool)
    return {"n_low": int(lo.sum()), "n_ok": int((~lo).sum()), "n_flagged": int(f.sum()),
            "sensitivity": round(float((f & lo).sum() / lo.sum()), 3) if lo.any() else None,
            "specificity": round(float((~f & ~lo).sum() / (~lo).sum()), 3) if (~lo).any() else None}


def prepare(work: Path, env: dict, args: argparse.Namespace) -> None:
    raw = work / "raw" / NAME
    if not raw.is_dir():
        autoseg(["phantom", "-o", str(work / "raw"), "--cases", str(args.cases), "--test-cases",
                 str(args.test_cases), "--seed", "16", "--size", "small"], env)
    if not (work / "pre" / NAME / "plans.json").is_file():
        autoseg(["plan_and_preprocess", "-d", NAME, "-c", "3d_fullres", "--device", "cpu", "-np", "1"], env)
    for fold in range(5):
        if not (work / "res" / NAME / "3d_fullres" / f"fold_{fold}" / "checkpoint_final.safetensors").is_file():
            autoseg(["train", "-d", NAME, "-c", "3d_fullres", "-f", str(fold), "--time-budget", str(args.minutes),
                     "--iters-per-epoch", "25", "--npz"], env)
    autoseg(["find_best_configuration", "-d", NAME], env)


def case_rows(pred: Path, refs: Path, plan: dict) -> tuple[list[dict], list[dict]]:
    """Per held-out case: expected and true Dice per structure, the flag; per predicted lesion: confidence, TP/FP."""
    cases, lesions = [], []
    for summary_path in sorted((pred / "uncertainty").glob("*.json")):
        s = json.loads(summary_path.read_text())
        seg, geo = read_image(pred / f"{s['case']}.nii.gz")
        ref = read_image(refs / f"{s['case']}.nii.gz")[0]
        true = dice_per_label(seg, ref, [int(k) for k in STRUCTURES])
        cases.append({"case": s["case"], "expected": s["expected_dice"], "true": true,
                      "flag": s["flag_for_review"], "reasons": s["reasons"]})
        for v in TUMOURS:
            det = lesion_detection(seg == v, ref == v, geo.spacing_zyx)["predicted"]
            mine = [les for les in s["lesions"] if les["value"] == v]
            for row in det:
                match = [les for les in mine if les["voxels"] == row["voxels"] and np.allclose(
                    les["centroid_index"], row["centroid_index"], atol=0.01)]
                if len(match) == 1:
                    lesions.append({"case": s["case"], "structure": STRUCTURES[str(v)], "voxels": row["voxels"],
                                    "true_positive": not row["false_positive"], **{
                                        k: match[0][k] for k in ("confidence", "mean_probability", "mean_entropy",
                                                                 "mean_mutual_information")}})
    return cases, lesions


def cv_rows(results: Path, refs: Path, plan: dict) -> list[dict]:
    """The calibration cases themselves: expected Dice from the saved validation probabilities, true Dice."""
    rows = []
    for npz in sorted(results.glob("fold_*/validation/*.npz")):
        probs, _ = read_probabilities(npz)
        seg = apply_postprocessing(read_image(npz.with_suffix("").with_suffix(".nii.gz"))[0], plan["postprocessing"])
        ref = read_image(refs / f"{npz.stem}.nii.gz")[0]
        rows.append({"case": npz.stem, "expected": expected_dice(probs, seg, [int(k) for k in STRUCTURES]),
                     "true": dice_per_label(seg, ref, [int(k) for k in STRUCTURES])})
    return rows


def quality_figures(rows: list[dict], review: dict | None, split: str) -> list[dict]:
    out = []
    for key, name in STRUCTURES.items():
        q = [r["expected"][key] for r in rows]
        d = [r["true"][key] for r in rows]
        low = [x < DICE_BELOW for x in d]
        row = {"split": split, "structure": name, "n": len(rows), "spearman": spearman(q, d),
               "auroc_low_dice": auroc([-x for x, lo in zip(q, low) if lo], [-x for x, lo in zip(q, low) if not lo]),
               "mean_true_dice": round(float(np.mean(d)), 3), "mean_expected_dice": round(float(np.mean(q)), 3)}
        if review and key in review["structures"]:
            t = review["structures"][key]["expected_dice_below"]
            row.update({"threshold": round(t, 4), **rates([x < t for x in q], low)})
        out.append(row)
    low_case = [any(r["true"][k] < DICE_BELOW for k in STRUCTURES) for r in rows]
    score = [min(r["expected"][k] for k in STRUCTURES) for r in rows]
    row = {"split": split, "structure": "any (case)", "n": len(rows),
           "auroc_low_dice": auroc([-s for s, lo in zip(score, low_case) if lo],
                                   [-s for s, lo in zip(score, low_case) if not lo])}
    if review:
        row.update(rates([bool(review_decision(r["expected"], review)[0]) for r in rows], low_case))
    out.append(row)
    return out


def in_process_overhead(results: Path, image: Path, rounds: int) -> list[dict]:
    """Seconds of one case's prediction (fold 0, 8 mirrorings) with and without the member statistics, alternated
    ``rounds`` times in one process and the fastest round of each kept (load only adds time); and the extra
    arrays' size."""
    import time

    import torch

    from autoseg.inference.predictor import Predictor

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    p = Predictor.from_trained(results / "3d_fullres", folds=["0"], precision="fp32")
    data, geo = read_image(image)
    pre, _ = p.preprocess(data[None].astype(np.float32), geo)
    best = {False: float("inf"), True: float("inf")}
    for _ in range(rounds):
        for mode in (False, True):
            t = time.perf_counter()
            p.probabilities_preprocessed(pre, uncertainty=mode)
            best[mode] = min(best[mode], time.perf_counter() - t)
    extra_mb = (p.models[0].num_outputs + 2) * int(np.prod(pre.shape[1:])) * 4 / 1e6  # stats + the MI channel
    return [{"mode": "in-process plain", "folds": "0", "members": p.members, "s_per_case": round(best[False], 2)},
            {"mode": "in-process --uncertainty", "folds": "0", "members": p.members,
             "s_per_case": round(best[True], 2), "extra_mb_preprocessed_grid": round(extra_mb, 1)}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/autoseg_bench_uncertainty"))
    ap.add_argument("--minutes", type=float, default=4.0, help="training budget per fold")
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--test-cases", type=int, default=10)
    ap.add_argument("--timing-cases", type=int, default=3, help="held-out cases predicted twice for the timing")
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds of the in-process timing")
    ap.add_argument("--no-tta", action="store_true",
                    help="predict the held-out cases without mirroring (members: the 5 folds; 8x less work on a CPU)")
    ap.add_argument("--timing-folds", nargs="+", default=["0"],
                    help="folds of the timing runs (default 0: one fold's 8 mirrorings, the overhead is per member)")
    args = ap.parse_args()
    work = args.work.resolve()
    env = {**os.environ, "AUTOSEG_RAW": str(work / "raw"), "AUTOSEG_PREPROCESSED": str(work / "pre"),
           "AUTOSEG_RESULTS": str(work / "res")}
    prepare(work, env, args)
    raw = work / "raw" / NAME
    results = work / "res" / NAME
    plan = json.loads((results / "inference_plan.json").read_text())
    review = plan.get("review")

    pred = work / "pred_uncertainty"
    if not (pred / "uncertainty").is_dir() or len(list((pred / "uncertainty").glob("*.json"))) < args.test_cases:
        autoseg(["predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", NAME, "--uncertainty",
                 *(["--no-tta"] if args.no_tta else [])], env)
    held_out, lesions = case_rows(pred, raw / "labelsTs", plan)
    cv = cv_rows(results / "3d_fullres", raw / "labelsTr", plan)
    quality = quality_figures(held_out, review, "held-out") + quality_figures(cv, review, "cv (in-sample)")

    tp = [les for les in lesions if les["true_positive"]]
    fp = [les for les in lesions if not les["true_positive"]]
    lesion_row = {"split": "held-out", "structure": "tumour lesions", "n": len(lesions), "n_true": len(tp),
                  "n_false_positive": len(fp),
                  "auroc_confidence": auroc([x["confidence"] for x in tp], [x["confidence"] for x in fp]),
                  "auroc_mean_probability": auroc([x["mean_probability"] for x in tp],
                                                  [x["mean_probability"] for x in fp])}

    # timing: the same cases and folds, with and without --uncertainty
    timing_in = work / "timing_in"
    timing_in.mkdir(exist_ok=True)
    for f in sorted((raw / "imagesTs").iterdir())[: args.timing_cases]:
        if not (timing_in / f.name).exists():
            (timing_in / f.name).symlink_to(f)
    timing = []
    for flag in ([], ["--uncertainty"]):
        out = work / f"timing_out{'_u' if flag else ''}"
        r = run_measured([sys.executable, "-m", "autoseg", "predict", "-i", str(timing_in), "-o", str(out), "-d",
                          NAME, "--overwrite", "-f", *args.timing_folds, *flag], env)
        timing.append({"mode": "--uncertainty" if flag else "plain", "cases": args.timing_cases,
                       "folds": " ".join(args.timing_folds),
                       "s_per_case": round(r["wall_s"] / args.timing_cases, 2), "peak_rss_gb": r["peak_rss_gb"]})
    timing += in_process_overhead(results, sorted((raw / "imagesTs").iterdir())[0], args.rounds)
    rows = quality + [lesion_row] + timing
    path = report("uncertainty", rows, ["split", "structure", "mode", "n", "spearman", "auroc_low_dice", "threshold",
                                        "n_low", "n_flagged", "sensitivity", "specificity", "auroc_confidence",
                                        "auroc_mean_probability", "n_true", "n_false_positive", "s_per_case",
                                        "peak_rss_gb", "extra_mb_preprocessed_grid"])
    data = json.loads(path.read_text())
    data.update({"review": review, "held_out_cases": held_out, "lesions": lesions, "machine": machine(),
                 "minutes_per_fold": args.minutes, "held_out_tta": not args.no_tta})
    path.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
