"""Fold training: SGD (or AdamW for short budgets) with a poly schedule, deep-supervised Dice+CE, checkpoints, logs, validation.

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

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..atomic import atomic_path, remove_stale_temporaries, write_json
from ..checkpoint import fit_weights, load_state, pick_device, save_checkpoint
from ..errors import AutosegError
from ..jsonfile import read_json
from ..labels import label_layout
from ..layout import (
    DATASET_JSON, LABELS_TR, LOG_JSONL, PLANS_JSON, PROGRESS_PNG, SPLITS_JSON, Roots, checkpoint_file, fold_dir,
    state_file,
)
from ..network import build_network, ds_scales
from .data import BatchLoader
from .losses import SegmentationLoss
from .splits import load_or_create_splits
from .validation import validate_fold

EMA_DECAY = 0.9
# SGD Nesterov is nnU-Net's choice for long runs; AdamW reaches organ-level Dice several times sooner, which is what
# a budget of minutes on a CPU needs (measured on the demo phantom, benchmarks/RESULTS.md).
DEFAULT_LR = {"sgd": 1e-2, "adamw": 3e-3}


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
    optimizer: str = "sgd"
    lr: float | None = None  # None: DEFAULT_LR of the optimizer
    weight_decay: float = 3e-5
    momentum: float = 0.99
    grad_clip: float = 12.0
    continue_training: bool = False
    validate: bool = True
    save_probabilities: bool = False
    num_workers: int | None = None

    @property
    def initial_lr(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr


def make_optimizer(model: torch.nn.Module, opts: TrainOptions) -> torch.optim.Optimizer:
    """SGD Nesterov (momentum, weight decay from ``opts``) or AdamW with the same weight decay."""
    if opts.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=opts.initial_lr, momentum=opts.momentum, nesterov=True,
                               weight_decay=opts.weight_decay)
    if opts.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=opts.initial_lr, weight_decay=opts.weight_decay)
    raise AutosegError(f"unknown optimizer {opts.optimizer!r}; use 'sgd' or 'adamw'")


def poly_lr(lr0: float, progress: float, exponent: float = 0.9) -> float:
    """nnU-Net's polynomial decay; ``progress`` in [0, 1] is epochs done or time spent, whichever is further."""
    return lr0 * (1 - min(progress, 1.0)) ** exponent


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


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()


def train_steps(model, loss_fn, optimizer, loader, iters, device, amp_dtype, scaler, grad_clip) -> float:
    """``iters`` SGD steps on batches from ``loader``; returns the mean loss (also used by the benchmark)."""
    model.train()
    _unwrap(model).deep_supervision = True
    total = 0.0
    for _ in range(iters):
        batch = next(loader)
        x = batch["data"].to(device, non_blocking=True)
        targets = [t.to(device, non_blocking=True) for t in batch["target"]]
        if device.type == "cuda" and x.ndim == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, amp_dtype):
            loss = loss_fn(model(x), targets)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        total += float(loss.detach())
    return total / max(iters, 1)


@torch.no_grad()
def _val_epoch(model, loss_fn, loader, iters, device, amp_dtype, regions: bool, n_out: int):
    """Validation loss and summed TP/FP/FN per foreground class on patches (the "pseudo Dice")."""
    model.eval()
    _unwrap(model).deep_supervision = True
    total = 0.0
    n_fg = n_out if regions else n_out - 1
    counts = torch.zeros(3, n_fg, dtype=torch.float64)
    for _ in range(iters):
        batch = next(loader)
        x = batch["data"].to(device)
        targets = [t.to(device) for t in batch["target"]]
        with _autocast(device, amp_dtype):
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


def _plot_progress(path: Path, log: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in log]
    fig, ax = plt.subplots(4, 1, figsize=(8, 11), sharex=True)
    ax[0].plot(ep, [r["train_loss"] for r in log], label="train loss")
    ax[0].plot(ep, [r["val_loss"] for r in log], label="val loss")
    ax[1].plot(ep, [r["ema_dice"] for r in log], label="EMA pseudo-Dice")
    for i in range(len(log[-1]["pseudo_dice"])):
        ax[1].plot(ep, [r["pseudo_dice"][i] for r in log], alpha=0.5, label=f"class {i + 1}")
    ax[2].plot(ep, [r["lr"] for r in log], label="learning rate")
    ax[3].plot(ep, [r["epoch_s"] for r in log], label="epoch seconds")
    for a in ax:
        a.legend(loc="best", fontsize=7)
    ax[3].set_xlabel("epoch")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def _write_log(folder: Path, log: list[dict[str, Any]]) -> None:
    with atomic_path(folder / LOG_JSONL) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in log))
    _plot_progress(folder / PROGRESS_PNG, log)


# ------------------------------------------------------------------------------------------------- train a fold


@dataclass
class _Setup:
    """Where and how a fold trains: plans, data, device and precision, fixed before the first epoch."""

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
    amp_dtype: torch.dtype | None = None


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


def _prepare(dataset: str, configuration: str, fold: int | str, roots: Roots, encoder: str | None = None) -> _Setup:
    """Read the plans, choose the fold's cases and (rank 0) create the output folder with plans and dataset.json;
    an ``encoder`` override is recorded in those plans, since predicting rebuilds the network from them."""
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
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)  # left by a run killed while writing a checkpoint or log
        write_json(results / configuration / PLANS_JSON, plans)
        write_json(results / configuration / DATASET_JSON, meta)
    return _Setup(plans, meta, config, data_folder, train_ids, val_ids, out, rank, world)


def _choose_device(setup: _Setup, opts: TrainOptions) -> None:
    """Device (one GPU per rank under torchrun), CPU thread count and mixed precision."""
    device = pick_device(opts.device)
    if device.type == "cuda" and setup.world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    # keep a thread count the user chose: on a shared machine, threads competing for busy cores can be 20x slower
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // setup.world))
    setup.device = device
    if device.type == "cuda":
        setup.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _resume(setup: _Setup, model: torch.nn.Module, optimizer: torch.optim.Optimizer, opts: TrainOptions,
            state: dict[str, Any]) -> None:
    """Restore weights, optimizer, RNG and run state from ``checkpoint_latest.state.pt`` (``--continue``)."""
    out = setup.out
    if not state_file(out).is_file():
        raise AutosegError(f"{out}: no checkpoint_latest to continue from; start without --continue")
    saved = load_state(out)
    trained_with = saved.pop("optimizer_name", "sgd")  # saved with each checkpoint, not part of the run state
    if trained_with != opts.optimizer:
        raise AutosegError(f"{out}: checkpoint_latest was trained with --optimizer {trained_with}; "
                           f"continue with the same optimizer (got {opts.optimizer})")
    # weights come from the state file itself: one atomic file, so a kill between writing the
    # .safetensors and the state can never pair one epoch's weights with another epoch's optimizer
    fit_weights(model, saved.pop("model"), state_file(out))
    optimizer.load_state_dict(saved.pop("optimizer"))
    torch.set_rng_state(saved.pop("torch_rng"))
    state.update(saved)
    if setup.rank == 0:
        print(f"continuing {out} from epoch {state['epoch']}")


def _should_stop(state: dict[str, Any], opts: TrainOptions, budget_s: float) -> tuple[bool, float]:
    """(whether to stop, training progress in [0, 1]): epochs done or time spent, whichever is further."""
    progress = max(state["epoch"] / opts.epochs, state["elapsed"] / budget_s)
    last_epoch_s = state["log"][-1]["epoch_s"] if state["log"] else 0.0
    return progress >= 1 or state["elapsed"] + last_epoch_s > budget_s, progress  # never start an epoch that overruns


def _run_epoch(setup: _Setup, model: torch.nn.Module, loss_fn: SegmentationLoss, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, opts: TrainOptions, fold: int | str, epoch: int,
               regions: list[list[int]] | None, n_out: int) -> tuple[float, float, torch.Tensor]:
    """One epoch of training and patch validation: (train loss, validation loss, summed TP/FP/FN per class)."""
    scales = ds_scales(setup.config)
    batch = max(1, setup.config["batch_size"] // setup.world)
    workers = opts.num_workers if opts.num_workers is not None else max(0, min(8, (os.cpu_count() or 1) - 2))
    seed = _epoch_seed(opts.seed, fold, epoch, setup.rank)
    train_loader = BatchLoader(setup.data_folder, setup.train_ids, setup.config, scales, batch, seed, workers, True,
                               regions)
    val_loader = BatchLoader(setup.data_folder, setup.val_ids, setup.config, scales, batch, seed + 1, 0, False,
                             regions)
    try:
        train_loss = train_steps(model, loss_fn, optimizer, train_loader, opts.iters_per_epoch, setup.device,
                                 setup.amp_dtype, scaler, opts.grad_clip)
        val_loss, counts = _val_epoch(model, loss_fn, val_loader, opts.val_iters, setup.device, setup.amp_dtype,
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
                  dice: list[float]) -> None:
    """Update the EMA pseudo-Dice, time and epoch count of the run state and append the epoch's log record."""
    seen = [d for d in dice if not math.isnan(d)]
    mean = float(np.mean(seen)) if seen else 0.0
    state["ema"] = mean if state["ema"] is None else EMA_DECAY * state["ema"] + (1 - EMA_DECAY) * mean
    state["elapsed"] += epoch_s
    state["epoch"] = epoch + 1
    record = {"epoch": epoch, "train_loss": round(train_loss, 5), "val_loss": round(val_loss, 5),
              "pseudo_dice": [round(d, 4) for d in dice], "ema_dice": round(state["ema"], 4),
              "lr": lr, "epoch_s": round(epoch_s, 2)}
    state["log"].append(record)


def _save_epoch(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, opts: TrainOptions,
                state: dict[str, Any], epoch: int, lr: float, epoch_s: float, train_loss: float, val_loss: float,
                dice: list[float]) -> None:
    """Checkpoints (best when the EMA improved, latest with the full run state), log and progress line."""
    improved = state["ema"] > state["best"]
    if improved:
        state["best"] = state["ema"]
        save_checkpoint(out, "best", model)
    save_checkpoint(out, "latest", model, {
        **state, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "optimizer_name": opts.optimizer,
        "torch_rng": torch.get_rng_state(),
    })
    _write_log(out, state["log"])
    dice_txt = " ".join("  nan" if math.isnan(d) else f"{d:.3f}" for d in dice)
    print(f"epoch {epoch:4d}  train {train_loss:.4f}  val {val_loss:.4f}  pseudo-Dice [{dice_txt}]  "
          f"EMA {state['ema']:.4f}{' *' if improved else ''}  lr {lr:.5f}  {epoch_s:.1f}s", flush=True)


def train_fold(dataset: str, configuration: str, fold: int | str, opts: TrainOptions, roots: Roots) -> Path:
    """Train one fold (or ``"all"``) of one configuration; returns the fold's output folder."""
    setup = _prepare(dataset, configuration, fold, roots, opts.encoder)
    _choose_device(setup, opts)
    device, config, out = setup.device, setup.config, setup.out
    if setup.rank == 0:  # until this run ends, the fold is unfinished (an older final must not pass for this one's)
        checkpoint_file(out, "final").unlink(missing_ok=True)
    scaler = torch.amp.GradScaler(device.type, enabled=setup.amp_dtype == torch.float16)

    n_out, regions, rco = label_layout(setup.meta)
    torch.manual_seed(opts.seed)
    model = build_network(config, len(setup.meta["channel_names"]), n_out, opts.encoder).to(device)
    if device.type == "cuda" and config["dims"] == 3:
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = make_optimizer(model, opts)
    state: dict[str, Any] = {"epoch": 0, "ema": None, "best": -1.0, "elapsed": 0.0, "log": []}
    if opts.continue_training:
        _resume(setup, model, optimizer, opts, state)
    if setup.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    loss_fn = SegmentationLoss(len(config["network"]["strides"]) - 1, batch_dice=config["dims"] == 3,
                               regions=regions is not None)
    budget_s = opts.time_budget_min * 60 if opts.time_budget_min else math.inf
    while True:
        epoch = state["epoch"]
        stop, progress = _should_stop(state, opts, budget_s)
        if stop:
            break
        lr = poly_lr(opts.initial_lr, progress)
        for g in optimizer.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        train_loss, val_loss, counts = _run_epoch(setup, model, loss_fn, optimizer, scaler, opts, fold, epoch,
                                                  regions, n_out)
        dice = pseudo_dice(counts)
        epoch_s = time.perf_counter() - t0
        _record_epoch(state, epoch, lr, epoch_s, train_loss, val_loss, dice)
        if setup.rank == 0:
            _save_epoch(out, _unwrap(model), optimizer, opts, state, epoch, lr, epoch_s, train_loss, val_loss, dice)
    if setup.rank == 0:
        if opts.validate:
            summary = validate_fold(_unwrap(model), setup.data_folder, out, setup.val_ids, config, setup.meta,
                                    roots.raw / dataset / LABELS_TR, rco, device, opts.save_probabilities)
            print(f"validation mean Dice per label: {summary['mean_dice']}")
        save_checkpoint(out, "final", _unwrap(model))  # last: a run that fails before here is visibly unfinished
    if setup.world > 1:
        dist.barrier()
    return out
