"""``autoseg demo``: the whole pipeline on a synthetic abdominal CT dataset, as a user would run it.

phantom -> plan_and_preprocess -> configure (measure what the budget holds of ``3d_fullres`` and ``2d`` and pick
one, :func:`~autoseg.training.schedule.choose_configuration`) -> train (time-budgeted) -> predict the test cases ->
evaluate -> report, each step through the same pipeline functions as its command, in a self-contained folder (its
own raw, preprocessed and results roots). At the end it prints the Dice table, checks the demo's quality targets and
says where the report is.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, TypeVar

from . import pipeline
from .errors import AutosegError
from .jsonfile import read_json
from .layout import IMAGES_TS, LABELS_TS, SUMMARY_JSON, Roots, checkpoint_file, fold_dir, state_file
from .parallel import DEFAULT_WORKERS
from .phantom import write_dataset
from .training.schedule import choose_configuration
from .training.trainer import TrainOptions

T = TypeVar("T")
NAME = "Dataset501_AbdomenPhantom"
# What the demo must reach on the phantom (issue: evaluation and demo); checked and printed, never hidden.
TARGETS = {"liver": 0.93, "kidney": 0.93, "liver_tumor": 0.60, "kidney_tumor": 0.60}
LESION_RECALL_TARGET = 0.80


def _num(value: Any) -> float:
    """A summary value as a float; summary.json stores undefined values (NaN) as null."""
    return math.nan if value is None else float(value)


def quality_table(summary: dict[str, Any]) -> tuple[list[str], bool]:
    """Lines comparing the evaluation summary with the demo targets, and whether all are met."""
    lines, ok = [], True
    structures = summary["structures"]
    for name, target in TARGETS.items():
        got = _num(structures.get(name, {}).get("dice_mean"))
        met = got >= target
        ok &= met
        lines.append(f"  {name:<14} Dice {got:6.3f}  target >= {target:.2f}  {'met' if met else 'NOT met'}")
    for name in ("liver_tumor", "kidney_tumor"):
        det = summary.get("lesion_detection", {}).get(name, {}).get("iou", {}).get(">=10mm", {})
        recall = _num(det.get("recall"))
        met = recall >= LESION_RECALL_TARGET
        ok &= met
        lines.append(f"  {name:<14} lesion recall (>= 10 mm, IoU > 0.5) {recall:6.3f} "
                     f"of {det.get('n_reference', 0)}  target >= {LESION_RECALL_TARGET:.2f}  {'met' if met else 'NOT met'}")
    return lines, ok


CANDIDATES = ("3d_fullres", "2d")  # 2d trains on the 3d_fullres data, so both are preprocessed once


def _choose(roots: Roots, opts: TrainOptions) -> str:
    """The configuration to train: one with a finished or started model (a rerun), else the one the budget suits
    best, measured (``schedule.choose_configuration``); prints the measurements and the reason."""
    for c in CANDIDATES:
        fold = fold_dir(roots.results / NAME / c, "all")
        if checkpoint_file(fold, "final").is_file() or state_file(fold).is_file():
            print(f"{c}: a model of it is already in {fold}; keeping it")
            return c
    estimates = {c: pipeline.estimate_training(roots, NAME, c, opts) for c in CANDIDATES}
    for c, e in estimates.items():
        per = f"{e['iteration_s']:.2f} s per iteration" if e["iteration_s"] else "not timed"
        print(f"  {c}: {per}, about {e['iterations']} iterations in {opts.time_budget_min:g} minutes")
    chosen, why = choose_configuration({c: e["iterations"] for c, e in estimates.items()})
    print(f"configuration: {why}", flush=True)
    return chosen


def _train(roots: Roots, configuration: str, opts: TrainOptions) -> None:
    """Train the demo's fold, continuing a started one; a finished model is kept (a rerun goes on to predict)."""
    fold = fold_dir(roots.results / NAME / configuration, "all")
    if checkpoint_file(fold, "final").is_file():
        print(f"already trained: {fold}")
        return
    pipeline.train(roots, NAME, configuration, "all", replace(opts, continue_training=state_file(fold).is_file()))


def _step(timings: list[tuple[str, float]], name: str, step: Callable[[], T]) -> T:
    """Run one demo step under its heading, add its seconds to ``timings`` and name it in an error."""
    print(f"\n== {name}", flush=True)
    t = time.perf_counter()
    try:
        result = step()
    except AutosegError as e:
        raise AutosegError(f"demo step '{name}' failed: {e}; fix it and rerun `autoseg demo`") from None
    timings.append((name, time.perf_counter() - t))
    return result


def run_demo(out: Path, train_cases: int = 24, test_cases: int = 8, time_budget: float = 11.0, epochs: int = 1000,
             iters_per_epoch: int = 25, val_iters: int = 4, seed: int = 0, device: str = "auto",
             tta: bool = False) -> bool:
    """Run every step into ``out`` (its own raw, preprocessed and results folders), print the quality table and
    the time per step; returns whether every demo target was met. A rerun reuses finished steps."""
    out = Path(out).resolve()
    roots = Roots(raw=out / "raw", preprocessed=out / "preprocessed", results=out / "results")
    raw = roots.raw / NAME
    pred, evaluation, report = out / "predictions", out / "evaluation", out / "report"
    opts = TrainOptions(epochs=epochs, iters_per_epoch=iters_per_epoch, val_iters=val_iters,
                        time_budget_min=time_budget, device=device, seed=seed, validate=False)
    start = time.perf_counter()
    timings: list[tuple[str, float]] = []
    _step(timings, "phantom", partial(write_dataset, roots.raw, train_cases, seed, "demo", test_cases, NAME))
    _step(timings, "plan_and_preprocess", partial(pipeline.plan_and_preprocess, roots, NAME, ["3d_fullres"], 2,
                                                  device="gpu" if device == "cuda" else "auto"))
    chosen = _step(timings, "configure", partial(_choose, roots, opts))
    _step(timings, "train", partial(_train, roots, chosen, opts))
    _step(timings, "predict", partial(pipeline.predict, roots, raw / IMAGES_TS, pred, dataset=NAME,
                                      configuration=chosen, device=device, mirror=tta))
    _step(timings, "evaluate", partial(pipeline.evaluate, roots, raw / LABELS_TS, pred, evaluation, dataset=NAME,
                                       num_workers=DEFAULT_WORKERS))
    _step(timings, "report", partial(pipeline.report, roots, pred, report, raw / IMAGES_TS, dataset=NAME,
                                     num_workers=DEFAULT_WORKERS))
    summary = read_json(evaluation / SUMMARY_JSON, "rerun `autoseg demo` (it evaluates again)")
    lines, ok = quality_table(summary)
    print(f"\n== demo quality on the held-out test cases ({chosen})")
    print("\n".join(lines))
    print("\n== time per step: " + ", ".join(f"{n} {s:.0f} s" for n, s in timings)
          + f"; total {time.perf_counter() - start:.0f} s")
    print(f"report: {report / 'report.html'}\nevaluation: {evaluation / SUMMARY_JSON}")
    if not ok:
        print("some demo targets were not met in this budget (see benchmarks/RESULTS.md for measured figures; "
              "a GPU or a larger --time-budget trains further)")
    return ok
