"""Fold training: a measured precision, a budget-aware optimizer and schedule, lesion-aware patches, deep-supervised
Dice+CE, checkpoints, logs with progress inside each epoch, validation.

Before the first epoch the run measures itself (``precision.probe``: a few real steps of the planned network in
every candidate precision) and, from the step time and the time budget, estimates the iterations it can afford and
picks the optimizer and warm-up (``schedule.choose_schedule``). Both choices are printed with their reasons, saved in
``training_setup.json`` and in the ``--continue`` state (a resumed run never re-decides them).

Layout (``AUTOSEG_RESULTS/<dataset>/``): ``splits.json`` (five folds by case id, user-editable, shared by every
configuration), and per configuration ``plans.json``, ``dataset.json`` and ``fold_<k>/`` with
``checkpoint_{latest,best,final}.safetensors`` (weights), ``checkpoint_latest.state.pt`` (weights again, optimizer,
schedule and RNG state: tensors and primitives only, loaded with ``weights_only=True``; ``--continue`` reads only
this one atomically written file), ``log.jsonl``, ``progress.png`` and
``validation/`` (predicted cases plus ``summary.json``).

Every epoch's data stream is seeded by (seed, fold, epoch, rank), so ``--continue`` after a crash replays exactly
what an uninterrupted run would have done from the last finished epoch.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from ..atomic import atomic_path, remove_stale_temporaries, write_json
from ..checkpoint import InitSource, fit_weights, init_from, load_state, pick_device, save_checkpoint
from ..errors import AutosegError
from ..jsonfile import read_json
from ..labels import LabelSpec, label_layout
from ..layout import (
    DATASET_JSON, LABELS_TR, LOG_JSONL, PLANS_JSON, PROGRESS_PNG, SPLITS_JSON, TRAINING_SETUP_JSON, Roots,
    checkpoint_file, fold_dir, state_file,
)
from ..network import build_network, ds_scales
from ..inference.predictor import previous_stage_dir
from ..precision import PRECISIONS, Precision, probe
from .data import BatchLoader, sampling_index
from .losses import SegmentationLoss
from .sampling import SamplingIndex
from .schedule import MIN_3D_ITERS, Schedule, budget_iterations, choose_schedule
from .splits import load_or_create_splits
from .validation import validate_fold

EMA_DECAY = 0.9
PROGRESS_EVERY_S = 20.0  # a progress line inside an epoch at most this often
LOADER_PROBE_BATCHES = 3  # augmented batches timed at the start, for the budget estimate


@dataclass(frozen=True)
class TrainOptions:
    """What a user may change about a training run; the rest comes from the plans."""

    epochs: int = 1000
    iters_per_epoch: int = 250
    val_iters: int = 50
    time_budget_min: float | None = None
    device: str = "auto"
    encoder: str | None = None
    seed: int = 0
    optimizer: str = "auto"  # auto: chosen from the iterations the budget holds (schedule.choose_schedule)
    lr: float | None = None  # None: the optimizer's default (schedule.DEFAULT_LR)
    precision: str = "auto"  # auto: measured (precision.probe); fp32, bf16 or fp16 force it
    weight_decay: float = 3e-5
    momentum: float = 0.99
    grad_clip: float = 12.0
    continue_training: bool = False
    validate: bool = True
    save_probabilities: bool = False
    num_workers: int | None = None
    init_from: InitSource | None = None  # weights to start from where they fit (train --init-from)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise AutosegError(f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")


def make_optimizer(model: torch.nn.Module, opts: TrainOptions, schedule: Schedule) -> torch.optim.Optimizer:
    """SGD Nesterov (momentum, weight decay from ``opts``) or AdamW with the same weight decay."""
    if schedule.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=schedule.initial_lr, momentum=opts.momentum, nesterov=True,
                               weight_decay=opts.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=schedule.initial_lr, weight_decay=opts.weight_decay)


def _distributed() -> tuple[int, int]:
    """(rank, world size); starts the process group under torchrun (nccl on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank() if world > 1 else 0), world


def _epoch_seed(seed: int, fold: int | str, epoch: int, rank: int) -> int:
    fold_id = -1 if fold == "all" else int(fold)
    return int(np.random.SeedSequence([seed, fold_id + 1, epoch, rank]).generate_state(1)[0])


# -------------------------------------------------------------------------------------------------- one epoch


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def train_steps(model, loss_fn, optimizer, loader, iters, device, precision: Precision, scaler, grad_clip,
                report: Callable[[int, float], None] | None = None,
                rate: Callable[[int], float] | None = None) -> float:
    """``iters`` optimizer steps on batches from ``loader``; returns the mean loss (also used by the benchmark).

    ``rate(i)`` is the learning rate of step ``i`` (set before it; None keeps the optimizer's); ``report(i, loss)`` is
    called after each step (progress inside an epoch)."""
    model.train()
    _unwrap(model).deep_supervision = True
    total = 0.0
    for i in range(iters):
        if rate is not None:
            for g in optimizer.param_groups:
                g["lr"] = rate(i)
        batch = next(loader)
        x = batch["data"].to(device, non_blocking=True)
        targets = [t.to(device, non_blocking=True) for t in batch["target"]]
        if precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast(device):
            loss = loss_fn(model(x), targets)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise AutosegError(f"the training loss became {value} at iteration {i}; lower --lr or use "
                               "--precision fp32 (nothing was saved from this epoch)")
        total += value
        if report is not None:
            report(i, value)
    return total / max(iters, 1)


@torch.no_grad()
def _val_epoch(model, loss_fn, loader, iters, device, precision: Precision, regions: bool, n_out: int):
    """Validation loss and summed TP/FP/FN per foreground class on patches (the "pseudo Dice")."""
    model.eval()
    _unwrap(model).deep_supervision = True
    total = 0.0
    n_fg = n_out if regions else n_out - 1
    counts = torch.zeros(3, n_fg, dtype=torch.float64)
    for _ in range(iters):
        batch = next(loader)
        x = batch["data"].to(device)
        if precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        targets = [t.to(device) for t in batch["target"]]
        with precision.autocast(device):
            out = model(x)
            total += float(loss_fn(out, targets))
        logits, target = out[0].float(), targets[0]
        if regions:
            pred, ref = logits > 0, target > 0.5
        else:
            pred = torch.nn.functional.one_hot(logits.argmax(1), n_out).movedim(-1, 1)[:, 1:].bool()
            ref = torch.nn.functional.one_hot(target[:, 0].long(), n_out).movedim(-1, 1)[:, 1:].bool()
        axes = [0] + list(range(2, pred.ndim))
        counts[0] += (pred & ref).sum(axes).cpu().double()
        counts[1] += (pred & ~ref).sum(axes).cpu().double()
        counts[2] += (~pred & ref).sum(axes).cpu().double()
    return total / max(iters, 1), counts


def pseudo_dice(counts: torch.Tensor) -> list[float]:
    """Dice per class from summed (TP, FP, FN); NaN for a class never seen nor predicted."""
    tp, fp, fn = counts
    denom = 2 * tp + fp + fn
    return [float(2 * t / d) if d > 0 else float("nan") for t, d in zip(tp, denom)]


# ---------------------------------------------------------------------------------------------------- logging


def output_names(meta: dict[str, Any]) -> list[str]:
    """Names of the network's foreground outputs, in order (labels 1..n-1, or the regions), for logs and plots."""
    spec = LabelSpec.from_meta(meta)
    n_out, regions, _ = spec.layout()
    if regions is not None:
        return [k for k in meta["labels"] if k != "background"]
    names = spec.names
    return [names.get(v, f"label {v}") for v in range(1, n_out)]


def _plot_progress(path: Path, log: list[dict[str, Any]], names: list[str]) -> None:
    """Losses, pseudo-Dice per structure (by name), learning rate and speed against epochs, with markers so that a
    run of one or two epochs still shows its points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in log]
    style = dict(marker="o", markersize=3)
    fig, ax = plt.subplots(4, 1, figsize=(8, 11), sharex=True)
    ax[0].plot(ep, [r["train_loss"] for r in log], label="train loss", **style)
    ax[0].plot(ep, [r["val_loss"] for r in log], label="validation loss", **style)
    ax[1].plot(ep, [r["ema_dice"] for r in log], label="EMA pseudo-Dice (mean)", color="black", **style)
    for i, name in enumerate(names):
        ax[1].plot(ep, [r["pseudo_dice"][i] for r in log], alpha=0.6, label=name, **style)
    ax[1].set_ylim(-0.02, 1.02)
    ax[2].plot(ep, [r["lr"] for r in log], label="learning rate", **style)
    ax[3].plot(ep, [r["epoch_s"] / max(r["iterations"] - (log[i - 1]["iterations"] if i else 0), 1)
                    for i, r in enumerate(log)], label="seconds per iteration (epoch incl. validation)", **style)
    for a in ax:
        a.legend(loc="best", fontsize=7)
        a.grid(alpha=0.3)
    ax[3].set_xlabel("epoch")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def _write_log(folder: Path, log: list[dict[str, Any]], names: list[str]) -> None:
    with atomic_path(folder / LOG_JSONL) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in log))
    _plot_progress(folder / PROGRESS_PNG, log, names)


# ------------------------------------------------------------------------------------------------- train a fold


@dataclass
class _Setup:
    """Where and how a fold trains: plans, data, device, precision and schedule, fixed before the first epoch."""

    plans: dict[str, Any]
    meta: dict[str, Any]
    config: dict[str, Any]
    data_folder: Path
    train_ids: list[str]
    val_ids: list[str]
    out: Path
    rank: int
    world: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: Precision = field(default_factory=Precision)
    schedule: Schedule | None = None
    workers: int = 0
    train_sampling: SamplingIndex | None = None
    val_sampling: SamplingIndex | None = None


def _read_plans(pp: Path, configuration: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``plans.json`` and ``dataset.json`` of the preprocessed dataset, checked to hold ``configuration``."""
    fix = "run `autoseg plan_and_preprocess` first (it writes plans.json and dataset.json)"
    plans = read_json(pp / PLANS_JSON, fix, "plans")
    meta = read_json(pp / DATASET_JSON, fix)
    if configuration not in plans["configurations"]:
        raise AutosegError(f"configuration {configuration} is not in {pp / PLANS_JSON} "
                           f"(planned: {sorted(plans['configurations'])})")
    return plans, meta


def _fold_cases(data_folder: Path, results: Path, configuration: str, fold: int | str) -> tuple[list[str], list[str]]:
    """(training ids, validation ids) of the fold; ``all`` trains and validates on every case."""
    case_ids = sorted(p.stem for p in data_folder.glob("*.json"))
    if not case_ids:
        raise AutosegError(f"{data_folder}: no preprocessed cases; run `autoseg plan_and_preprocess -c {configuration}`")
    if fold == "all":
        return case_ids, case_ids
    split = load_or_create_splits(results / SPLITS_JSON, case_ids, int(fold))[int(fold)]
    return split["train"], split["val"]


def _prepare(dataset: str, configuration: str, fold: int | str, roots: Roots, encoder: str | None = None,
             create: bool = True) -> _Setup:
    """Read the plans, choose the fold's cases and (rank 0, ``create``) create the output folder with plans and
    dataset.json; an ``encoder`` override is recorded in those plans, since predicting rebuilds the network from them."""
    rank, world = _distributed()
    pp = roots.preprocessed / dataset
    plans, meta = _read_plans(pp, configuration)
    if encoder:
        plans["configurations"][configuration]["network"]["encoder"] = encoder
    config = plans["configurations"][configuration]
    data_folder = pp / config["data_identifier"]
    results = roots.results / dataset
    train_ids, val_ids = _fold_cases(data_folder, results, configuration, fold)
    out = fold_dir(results / configuration, fold)
    if rank == 0 and create:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)  # left by a run killed while writing a checkpoint or log
        write_json(results / configuration / PLANS_JSON, plans)
        write_json(results / configuration / DATASET_JSON, meta)
    return _Setup(plans, meta, config, data_folder, train_ids, val_ids, out, rank, world)


def _choose_device(setup: _Setup, opts: TrainOptions) -> None:
    """Device (one GPU per rank under torchrun), CPU thread count and data-loading processes."""
    device = pick_device(opts.device)
    if device.type == "cuda" and setup.world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    # keep a thread count the user chose: on a shared machine, threads competing for busy cores can be 20x slower
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // setup.world))
    setup.device = device
    setup.workers = opts.num_workers if opts.num_workers is not None else max(0, min(8, (os.cpu_count() or 1) - 2))
    tumours = LabelSpec.from_meta(setup.meta).tumour_values()
    setup.train_sampling = sampling_index(setup.data_folder, setup.train_ids, tumours, setup.config)
    setup.val_sampling = sampling_index(setup.data_folder, setup.val_ids, tumours, setup.config)


def _loader(setup: _Setup, seed: int, train: bool, workers: int, regions: list[list[int]] | None) -> BatchLoader:
    """The epoch's training (augmented, lesion-aware) or validation batches."""
    ids, sampling = (setup.train_ids, setup.train_sampling) if train else (setup.val_ids, setup.val_sampling)
    batch = max(1, setup.config["batch_size"] // setup.world)
    return BatchLoader(setup.data_folder, ids, setup.config, ds_scales(setup.config), batch, seed, workers, train,
                       regions, sampling)


def _measure(setup: _Setup, model: torch.nn.Module, loss_fn: SegmentationLoss, opts: TrainOptions,
             regions: list[list[int]] | None) -> tuple[Precision, float]:
    """(the fastest sound precision, seconds to load one augmented batch in-process), timed on real batches.

    The probe runs forward and backward passes only (no optimizer step), so the weights are untouched; its batches
    come from a loader of their own, so the training data stream is the same as without it.
    """
    loader = _loader(setup, opts.seed + 7919, True, 0, regions)
    try:
        t0 = time.perf_counter()
        batches = [next(loader) for _ in range(LOADER_PROBE_BATCHES)]
        load_s = (time.perf_counter() - t0) / LOADER_PROBE_BATCHES
    finally:
        loader.close()
    x = batches[0]["data"].to(setup.device)
    targets = [t.to(setup.device) for t in batches[0]["target"]]
    dims = x.ndim - 2

    def run(mode: str, channels_last: bool) -> torch.Tensor:
        fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        model.to(memory_format=fmt)
        model.zero_grad(set_to_none=True)
        with Precision(mode, channels_last).autocast(setup.device):
            loss = loss_fn(model(x.contiguous(memory_format=fmt)), targets)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach().float()

    model.train()
    model.deep_supervision = True
    chosen = probe(run, setup.device, dims, opts.precision)
    model.to(memory_format=torch.channels_last_3d if chosen.channels_last else torch.contiguous_format)
    return chosen, load_s


def _agree(setup: _Setup, precision: Precision, iterations: int) -> tuple[Precision, int]:
    """Under torchrun every rank must train alike: rank 0's measured precision and iteration estimate win."""
    if setup.world == 1:
        return precision, iterations
    modes = PRECISIONS[1:]
    packed = torch.tensor([modes.index(precision.mode), int(precision.channels_last), iterations], dtype=torch.int64)
    dist.broadcast(packed, 0)
    mode, channels_last, iterations = packed.tolist()
    if setup.rank != 0:
        precision = Precision(modes[mode], bool(channels_last), precision.seconds, "rank 0's measurement")
    return precision, iterations


def _estimate(setup: _Setup, model: torch.nn.Module, loss_fn: SegmentationLoss, opts: TrainOptions,
              regions: list[list[int]] | None) -> tuple[Precision, float, float | None, int]:
    """(precision, seconds to load a batch, seconds per iteration, iterations the run holds), measured."""
    if setup.rank == 0:
        print(f"measuring data loading and a training step in each precision on {setup.device} ...", flush=True)
    precision, load_s = _measure(setup, model, loss_fn, opts, regions)
    step_s = precision.step_s
    # seconds per training iteration: the step, the in-process loading it waits for, and its share of validation
    iter_s = None
    if step_s is not None:
        iter_s = step_s + (load_s if setup.workers == 0 else 0.0)
        iter_s += opts.val_iters / max(opts.iters_per_epoch, 1) * (step_s / 3 + load_s / 2)
    budget_s = opts.time_budget_min * 60 if opts.time_budget_min else None
    return precision, load_s, iter_s, budget_iterations(budget_s, iter_s, opts.epochs * opts.iters_per_epoch)


def _network(setup: _Setup, opts: TrainOptions, n_out: int, regions: list[list[int]] | None
             ) -> tuple[torch.nn.Module, SegmentationLoss]:
    """The planned network on the setup's device, seeded with ``opts.seed`` (the same initial weights on every run
    and rank), and its deep-supervised loss."""
    torch.manual_seed(opts.seed)
    model = build_network(setup.config, len(setup.meta["channel_names"]), n_out, opts.encoder).to(setup.device)
    loss_fn = SegmentationLoss(len(setup.config["network"]["strides"]) - 1, batch_dice=setup.config["dims"] == 3,
                               regions=regions is not None)
    return model, loss_fn


def estimate_run(dataset: str, configuration: str, opts: TrainOptions, roots: Roots) -> dict[str, Any]:
    """What a run of ``configuration`` on every case would get, measured as ``train_fold`` measures it before its
    first epoch (precision, seconds per iteration, iterations ``opts``' budget holds); trains and writes nothing."""
    setup = _prepare(dataset, configuration, "all", roots, opts.encoder, create=False)
    _choose_device(setup, opts)
    n_out, regions, _ = label_layout(setup.meta)
    model, loss_fn = _network(setup, opts, n_out, regions)
    precision, _, iter_s, total = _estimate(setup, model, loss_fn, opts, regions)
    return {"configuration": configuration, "precision": precision.to_json(), "iteration_s": iter_s,
            "iterations": total}


def _plan_run(setup: _Setup, model: torch.nn.Module, loss_fn: SegmentationLoss, opts: TrainOptions,
              regions: list[list[int]] | None) -> dict[str, Any]:
    """Measure the precision and choose the schedule from the iterations the budget holds; print why."""
    precision, load_s, iter_s, total = _estimate(setup, model, loss_fn, opts, regions)
    step_s = precision.step_s
    budget_s = opts.time_budget_min * 60 if opts.time_budget_min else None
    precision, total = _agree(setup, precision, total)
    schedule = choose_schedule(total, opts.optimizer, opts.lr)
    setup_info = {"precision": precision.to_json(), "schedule": schedule.to_json(),
                  "estimate": {"step_s": step_s, "load_s": round(load_s, 4), "iteration_s": iter_s,
                               "budget_min": opts.time_budget_min, "iterations": total,
                               "workers": setup.workers, "device": str(setup.device)}}
    if setup.rank == 0:
        where = f"{opts.time_budget_min:g}-minute budget" if budget_s else f"{opts.epochs} epochs x {opts.iters_per_epoch}"
        per = f"{iter_s:.2f} s per iteration" if iter_s else "not timed"
        print(f"precision: {precision.mode}{' + channels-last' if precision.channels_last else ''} on {setup.device} "
              f"({precision.reason})", flush=True)
        print(f"schedule: {schedule.optimizer}, initial lr {schedule.initial_lr:g}, warm-up {schedule.warmup_iters} "
              f"iterations; about {total} iterations in the {where} ({per}, data loading {load_s:.2f} s/batch); "
              f"{schedule.reason}", flush=True)
        if budget_s and setup.config["dims"] == 3 and total < MIN_3D_ITERS:
            print(f"note: {total} iterations are fewer than the {MIN_3D_ITERS} a 3D configuration needed to learn "
                  "the tumours on the demo phantom; `-c 2d` gets more in the same budget (on a CPU a 2d iteration "
                  "costs about a quarter of a 3D one); `autoseg demo` measures both and chooses", flush=True)
    return setup_info


def _resume(setup: _Setup, model: torch.nn.Module, opts: TrainOptions, state: dict[str, Any]
            ) -> tuple[dict[str, Any], dict[str, Any], torch.Tensor]:
    """Read ``checkpoint_latest.state.pt`` (``--continue``) into the model and run state; returns the saved setup it
    must keep, the optimizer state and the torch RNG state (applied once the optimizer exists)."""
    out = setup.out
    if not state_file(out).is_file():
        raise AutosegError(f"{out}: no checkpoint_latest to continue from; start without --continue")
    saved = load_state(out)
    setup_info = saved.pop("setup", None)
    if not isinstance(setup_info, dict):
        raise AutosegError(f"{state_file(out)} was written by an older autoseg (no saved precision and schedule); "
                           "start the run again without --continue")
    schedule = Schedule.from_json(setup_info.get("schedule", {}))
    if opts.optimizer != "auto" and opts.optimizer != schedule.optimizer:
        raise AutosegError(f"{out}: checkpoint_latest was trained with --optimizer {schedule.optimizer}; "
                           f"continue with the same optimizer (got {opts.optimizer})")
    setup.precision = Precision.from_json(setup_info.get("precision", {}))
    setup.schedule = schedule
    # weights come from the state file itself: one atomic file, so a kill between writing the
    # .safetensors and the state can never pair one epoch's weights with another epoch's optimizer
    fit_weights(model, saved.pop("model"), state_file(out))
    optimizer_state, rng = saved.pop("optimizer"), saved.pop("torch_rng")
    state.update(saved)
    if setup.rank == 0:
        print(f"continuing {out} from epoch {state['epoch']} ({schedule.optimizer}, {setup.precision.mode})")
    return setup_info, optimizer_state, rng


def _progress(state: dict[str, Any], epoch: int, iters: int, budget_s: float, setup_info: dict[str, Any]
              ) -> Callable[[int, float], None]:
    """A reporter for ``train_steps``: a line at most every ``PROGRESS_EVERY_S`` seconds with the iteration, loss,
    speed and what is left of the budget."""
    t0 = time.perf_counter()
    last = [t0]
    planned = setup_info["estimate"]["iterations"]

    def report(i: int, loss: float) -> None:
        now = time.perf_counter()
        if now - last[0] < PROGRESS_EVERY_S:
            return
        last[0] = now
        per = (now - t0) / (i + 1)
        done = state["iterations"] + i + 1
        left = (f"{(budget_s - state['elapsed'] - (now - t0)) / 60:.1f} min of the budget left"
                if math.isfinite(budget_s) else f"epoch {epoch + 1} of the run")
        print(f"  epoch {epoch}  iteration {i + 1}/{iters}  loss {loss:.4f}  {per:.2f} s/it  "
              f"{done}/{planned} planned iterations  {left}", flush=True)

    return report


def epoch_rates(schedule: Schedule, done: int, progress: float, total: float) -> Callable[[int], float]:
    """The learning rate of step ``i`` of an epoch that starts after ``done`` iterations at run progress ``progress``.

    Set before every step, so the warm-up follows iterations even where one epoch is a large share of the run. With
    a time budget the run is ``total`` iterations long (the schedule's saved estimate) and the decay follows
    iterations too: a CPU budget of 1,000 iterations is four default 250-iteration epochs, and a rate set once per
    epoch would never start the final decay. Without one (``total`` infinite) the run is its epochs long and the
    rate holds through an epoch, so ``--continue`` with more epochs replays the rates of the longer run. Only saved
    state goes in, so a resumed run replays the same rates."""
    def rate(i: int) -> float:
        n = done + i
        return schedule.lr_at(n, max(progress, n / total))

    return rate


def _should_stop(state: dict[str, Any], opts: TrainOptions, budget_s: float) -> tuple[bool, float]:
    """(whether to stop, training progress in [0, 1]): epochs done or time spent, whichever is further."""
    progress = max(state["epoch"] / opts.epochs, state["elapsed"] / budget_s)
    last_epoch_s = state["log"][-1]["epoch_s"] if state["log"] else 0.0
    return progress >= 1 or state["elapsed"] + last_epoch_s > budget_s, progress  # never start an epoch that overruns


def _run_epoch(setup: _Setup, model: torch.nn.Module, loss_fn: SegmentationLoss, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, opts: TrainOptions, fold: int | str, epoch: int,
               regions: list[list[int]] | None, n_out: int, report: Callable[[int, float], None] | None,
               rate: Callable[[int], float]) -> tuple[float, float, torch.Tensor]:
    """One epoch of training and patch validation: (train loss, validation loss, summed TP/FP/FN per class)."""
    seed = _epoch_seed(opts.seed, fold, epoch, setup.rank)
    train_loader = _loader(setup, seed, True, setup.workers, regions)
    val_loader = _loader(setup, seed + 1, False, 0, regions)
    try:
        train_loss = train_steps(model, loss_fn, optimizer, train_loader, opts.iters_per_epoch, setup.device,
                                 setup.precision, scaler, opts.grad_clip, report, rate)
        val_loss, counts = _val_epoch(model, loss_fn, val_loader, opts.val_iters, setup.device, setup.precision,
                                      regions is not None, n_out)
    finally:
        train_loader.close()
        val_loader.close()
    if setup.world > 1:
        packed = torch.cat([torch.tensor([train_loss, val_loss], dtype=torch.float64), counts.flatten()])
        dist.all_reduce(packed)
        train_loss, val_loss = float(packed[0]) / setup.world, float(packed[1]) / setup.world
        counts = packed[2:].reshape(counts.shape)
    return train_loss, val_loss, counts


def _record_epoch(state: dict[str, Any], epoch: int, lr: float, epoch_s: float, train_loss: float, val_loss: float,
                  dice: list[float], iters: int) -> None:
    """Update the EMA pseudo-Dice, time, epoch and iteration counts of the run state and append the log record."""
    seen = [d for d in dice if not math.isnan(d)]
    mean = float(np.mean(seen)) if seen else 0.0
    state["ema"] = mean if state["ema"] is None else EMA_DECAY * state["ema"] + (1 - EMA_DECAY) * mean
    state["elapsed"] += epoch_s
    state["epoch"] = epoch + 1
    state["iterations"] += iters
    record = {"epoch": epoch, "train_loss": round(train_loss, 5), "val_loss": round(val_loss, 5),
              "pseudo_dice": [round(d, 4) for d in dice], "ema_dice": round(state["ema"], 4),
              "lr": lr, "epoch_s": round(epoch_s, 2), "iterations": state["iterations"]}
    state["log"].append(record)


def _save_epoch(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, setup_info: dict[str, Any],
                state: dict[str, Any], names: list[str]) -> None:
    """Checkpoints (best when the EMA improved, latest with the full run state), log and the epoch's line."""
    r = state["log"][-1]
    improved = state["ema"] > state["best"]
    if improved:
        state["best"] = state["ema"]
        save_checkpoint(out, "best", model)
    save_checkpoint(out, "latest", model, {
        **state, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "setup": setup_info,
        "torch_rng": torch.get_rng_state(),
    })
    _write_log(out, state["log"], names)
    dice_txt = " ".join(f"{n} {'nan' if math.isnan(d) else f'{d:.3f}'}" for n, d in zip(names, r["pseudo_dice"]))
    print(f"epoch {r['epoch']:4d}  train {r['train_loss']:.4f}  val {r['val_loss']:.4f}  pseudo-Dice [{dice_txt}]  "
          f"EMA {state['ema']:.4f}{' *' if improved else ''}  lr {r['lr']:.5f}  {r['epoch_s']:.1f}s  "
          f"({r['iterations']} iterations)", flush=True)


def train_fold(dataset: str, configuration: str, fold: int | str, opts: TrainOptions, roots: Roots) -> Path:
    """Train one fold (or ``"all"``) of one configuration; returns the fold's output folder."""
    setup = _prepare(dataset, configuration, fold, roots, opts.encoder)
    if opts.validate and "previous_stage" in setup.config:  # fail now, not after training, when stage 1 is missing
        previous_stage_dir(setup.out.parent, setup.config, [str(fold)])
    _choose_device(setup, opts)
    device, config, out = setup.device, setup.config, setup.out
    if setup.rank == 0:  # until this run ends, the fold is unfinished (an older final must not pass for this one's)
        checkpoint_file(out, "final").unlink(missing_ok=True)
    n_out, regions, rco = label_layout(setup.meta)
    names = output_names(setup.meta)
    model, loss_fn = _network(setup, opts, n_out, regions)
    initialised = None if opts.init_from is None or opts.continue_training else init_from(model, config, opts.init_from)
    state: dict[str, Any] = {"epoch": 0, "ema": None, "best": -1.0, "elapsed": 0.0, "iterations": 0, "log": []}
    if opts.continue_training:
        setup_info, optimizer_state, rng = _resume(setup, model, opts, state)
    else:
        setup_info = _plan_run(setup, model, loss_fn, opts, regions)
        setup.precision = Precision.from_json(setup_info["precision"])
        setup.schedule = Schedule.from_json(setup_info["schedule"])
        optimizer_state = rng = None
        if initialised is not None:
            setup_info["init_from"] = initialised
        if setup.rank == 0 and initialised is not None:
            print(f"initialised from {initialised['source']}: {initialised['loaded']} tensors loaded, "
                  f"{len(initialised['initialised'])} keep their initialisation: {initialised['initialised']}")
        if setup.rank == 0:
            write_json(out / TRAINING_SETUP_JSON, setup_info)
    # the agreed memory format: under torchrun a rank whose own probe chose differently must still match rank 0
    model.to(memory_format=torch.channels_last_3d if setup.precision.channels_last else torch.contiguous_format)
    optimizer = make_optimizer(model, opts, setup.schedule)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
        torch.set_rng_state(rng)
    scaler = torch.amp.GradScaler(device.type, enabled=setup.precision.mode == "fp16")
    if setup.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    budget_s = opts.time_budget_min * 60 if opts.time_budget_min else math.inf
    while True:
        epoch = state["epoch"]
        stop, progress = _should_stop(state, opts, budget_s)
        if stop:
            break
        rate = epoch_rates(setup.schedule, state["iterations"], progress,
                           max(setup.schedule.budget_iters, 1) if opts.time_budget_min else math.inf)
        lr = rate(0)
        report = _progress(state, epoch, opts.iters_per_epoch, budget_s, setup_info) if setup.rank == 0 else None
        t0 = time.perf_counter()
        train_loss, val_loss, counts = _run_epoch(setup, model, loss_fn, optimizer, scaler, opts, fold, epoch,
                                                  regions, n_out, report, rate)
        _record_epoch(state, epoch, lr, time.perf_counter() - t0, train_loss, val_loss, pseudo_dice(counts),
                      opts.iters_per_epoch)
        if setup.rank == 0:
            _save_epoch(out, _unwrap(model), optimizer, setup_info, state, names)
    if setup.rank == 0:
        print(f"trained {state['iterations']} iterations in {state['elapsed'] / 60:.1f} min "
              f"(estimated {setup_info['estimate']['iterations']})", flush=True)
        if opts.validate:
            summary = validate_fold(_unwrap(model), setup.data_folder, out, setup.val_ids, config, setup.meta,
                                    roots.raw / dataset / LABELS_TR, rco, device, opts.save_probabilities,
                                    setup.precision)
            print(f"validation mean Dice per label: {summary['mean_dice']}")
        save_checkpoint(out, "final", _unwrap(model))  # last: a run that fails before here is visibly unfinished
    if setup.world > 1:
        dist.barrier()
    return out
