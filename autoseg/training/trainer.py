"""Fold training: splits, SGD (or AdamW for short budgets) with a poly schedule, deep-supervised Dice+CE, checkpoints, logs, validation.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path, remove_stale_temporaries, write_json
from .data import BatchLoader
from ..io.images import write_image, write_probabilities
from ..errors import AutosegError
from ..evaluation.evaluate import dice_per_label
from .losses import SegmentationLoss
from ..network import build_network, ds_scales
from ..layout import Roots
from ..inference.predictor import labels_from_probabilities, predict_probabilities  # noqa: F401  (re-exported for tests)

N_FOLDS = 5
SPLIT_SEED = 12345
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


# ---------------------------------------------------------------------------------------------------- splits


def make_splits(case_ids: list[str], n_folds: int = N_FOLDS, seed: int = SPLIT_SEED) -> list[dict[str, list[str]]]:
    """``n_folds`` folds over sorted case ids, shuffled with a fixed seed (same ids give the same splits)."""
    ids = sorted(case_ids)
    if len(ids) < n_folds:
        raise AutosegError(f"{len(ids)} training cases cannot make {n_folds} folds; use --fold all")
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = [set(f.tolist()) for f in np.array_split(order, n_folds)]
    return [{"train": sorted(ids[i] for i in order if i not in f), "val": sorted(ids[i] for i in f)} for f in folds]


def load_or_create_splits(path: Path, case_ids: list[str]) -> list[dict[str, list[str]]]:
    """The splits in ``path`` if present (a user may have edited them), else new ones written there."""
    if path.is_file():
        splits = json.loads(path.read_text())
        unknown = sorted({c for s in splits for c in s["train"] + s["val"]} - set(case_ids))
        if unknown:
            raise AutosegError(f"{path}: cases {unknown[:5]} are not preprocessed; fix the file or delete it")
        return splits
    splits = make_splits(case_ids)
    write_json(path, splits)
    return splits


# ------------------------------------------------------------------------------------------------ set-up helpers


def label_layout(meta: dict[str, Any]) -> tuple[int, list[list[int]] | None, list[int] | None]:
    """(number of outputs, regions or None, regions_class_order or None) from ``dataset.json`` labels.

    A label given as a list of values makes the dataset region-based (nnU-Net convention): one sigmoid output
    per non-background label, and ``regions_class_order`` tells which label each region paints, in order.
    """
    labels = {k: v for k, v in meta["labels"].items() if k != "background"}
    if any(isinstance(v, list) for v in labels.values()):
        if "regions_class_order" not in meta:
            raise AutosegError("dataset.json declares regions (a label given as a list) but no 'regions_class_order'")
        regions = [v if isinstance(v, list) else [v] for v in labels.values()]
        return len(regions), regions, list(meta["regions_class_order"])
    values = sorted([0] + list(labels.values()))
    if values != list(range(len(values))):
        raise AutosegError(f"dataset.json labels must be consecutive 0..{len(values) - 1}, found {values}")
    return len(values), None, None


def predicted_labels(meta: dict[str, Any]) -> list[int]:
    """The label values a trained model paints (``regions_class_order`` for region-based datasets), the ones
    validation and model selection score."""
    _, _, rco = label_layout(meta)
    return sorted(set(rco) if rco else {v for k, v in meta["labels"].items() if k != "background"})


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise AutosegError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(choice)


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


# ----------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(folder: Path, name: str, model: torch.nn.Module, state: dict[str, Any] | None = None) -> None:
    """Weights as safetensors; optional training state via ``torch.save`` of tensors and primitives only."""
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / f"checkpoint_{name}.safetensors") as tmp:
        save_file(weights, str(tmp))
    if state is not None:
        with atomic_path(folder / f"checkpoint_{name}.state.pt") as tmp:
            torch.save(state, tmp)


def load_weights(path: Path, model: torch.nn.Module) -> None:
    try:
        weights = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise AutosegError(f"{path}: not a readable safetensors checkpoint ({e})") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise AutosegError(f"{path}: weights do not fit the planned network (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}); was it trained with other plans or --encoder?")


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
    with atomic_path(folder / "log.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in log))
    _plot_progress(folder / "progress.png", log)


# ----------------------------------------------------------------------------------------------- validation


def validate_fold(model, data_folder: Path, out: Path, val_ids: list[str], config: dict[str, Any],
                  meta: dict[str, Any], raw_labels: Path, regions_class_order, device,
                  save_probabilities: bool = False) -> dict[str, Any]:
    """Predict each validation case to ``out/validation`` and score it against the raw label."""
    from ..io.images import read_image

    folder = out / "validation"
    labels = predicted_labels(meta)
    per_case = {}
    for case in val_ids:
        props = json.loads((data_folder / f"{case}.json").read_text())
        data = np.load(data_folder / f"{case}.npy", mmap_mode="r", allow_pickle=False)
        # mirroring multiplies the cost by 2**dims: worth it on a GPU, not in a CPU training job
        probs, geometry = predict_probabilities([_unwrap(model)], data, props, config,
                                                regions_class_order is not None, device, mirror=device.type == "cuda")
        seg = labels_from_probabilities(probs, regions_class_order)
        if save_probabilities:  # for ensembles in find_best_configuration
            write_probabilities(folder / f"{case}.npz", probs, geometry)
        write_image(folder / f"{case}{meta['file_ending']}", seg, geometry)
        ref_path = raw_labels / f"{case}{meta['file_ending']}"
        if ref_path.is_file():
            per_case[case] = dice_per_label(seg, read_image(ref_path)[0], labels)
    mean = {str(v): float(np.mean([d[str(v)] for d in per_case.values()])) for v in labels} if per_case else {}
    summary = {"dice_per_case": per_case, "mean_dice": mean,
               "mean_foreground_dice": float(np.mean(list(mean.values()))) if mean else None}
    write_json(folder / "summary.json", summary)
    return summary


# ------------------------------------------------------------------------------------------------- train a fold


def train_fold(dataset: str, configuration: str, fold: int | str, opts: TrainOptions, roots: Roots) -> Path:
    """Train one fold (or ``"all"``) of one configuration; returns the fold's output folder."""
    rank, world = _distributed()
    pp = roots.preprocessed / dataset
    try:
        plans = json.loads((pp / "plans.json").read_text())
        meta = json.loads((pp / "dataset.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AutosegError(f"{pp}: plans.json/dataset.json missing or unreadable ({e}); "
                           "run `autoseg plan_and_preprocess` first") from None
    from ..schemas import validate

    validate(plans, "plans", str(pp / "plans.json"))
    if configuration not in plans["configurations"]:
        raise AutosegError(f"configuration {configuration} is not in {pp / 'plans.json'} "
                           f"(planned: {sorted(plans['configurations'])})")
    config = plans["configurations"][configuration]
    data_folder = pp / config["data_identifier"]
    case_ids = sorted(p.stem for p in data_folder.glob("*.json"))
    if not case_ids:
        raise AutosegError(f"{data_folder}: no preprocessed cases; run `autoseg plan_and_preprocess -c {configuration}`")
    results = roots.results / dataset
    if fold == "all":
        train_ids = val_ids = case_ids
    else:
        split = load_or_create_splits(results / "splits.json", case_ids)[int(fold)]
        train_ids, val_ids = split["train"], split["val"]
    out = results / configuration / f"fold_{fold}"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)  # left by a run killed while writing a checkpoint or log
        write_json(results / configuration / "plans.json", plans)
        write_json(results / configuration / "dataset.json", meta)

    device = pick_device(opts.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    # keep a thread count the user chose: on a shared machine, threads competing for busy cores can be 20x slower
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    amp_dtype = None
    if device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    n_out, regions, rco = label_layout(meta)
    in_channels = len(meta["channel_names"])
    torch.manual_seed(opts.seed)
    model = build_network(config, in_channels, n_out, opts.encoder).to(device)
    if device.type == "cuda" and config["dims"] == 3:
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = make_optimizer(model, opts)
    state: dict[str, Any] = {"epoch": 0, "ema": None, "best": -1.0, "elapsed": 0.0, "log": []}
    if opts.continue_training:
        if not (out / "checkpoint_latest.state.pt").is_file():
            raise AutosegError(f"{out}: no checkpoint_latest to continue from; start without --continue")
        saved = torch.load(out / "checkpoint_latest.state.pt", map_location="cpu", weights_only=True)
        trained_with = saved.pop("optimizer_name", "sgd")  # saved with each checkpoint, not part of the run state
        if trained_with != opts.optimizer:
            raise AutosegError(f"{out}: checkpoint_latest was trained with --optimizer {trained_with}; "
                               f"continue with the same optimizer (got {opts.optimizer})")
        # weights come from the state file itself: one atomic file, so a kill between writing the
        # .safetensors and the state can never pair one epoch's weights with another epoch's optimizer
        model.load_state_dict(saved.pop("model"))
        optimizer.load_state_dict(saved.pop("optimizer"))
        torch.set_rng_state(saved.pop("torch_rng"))
        state.update(saved)
        if rank == 0:
            print(f"continuing {out} from epoch {state['epoch']}")
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    loss_fn = SegmentationLoss(len(config["network"]["strides"]) - 1, batch_dice=config["dims"] == 3,
                               regions=regions is not None)
    scales = ds_scales(config)
    batch = max(1, config["batch_size"] // world)
    workers = opts.num_workers if opts.num_workers is not None else max(0, min(8, (os.cpu_count() or 1) - 2))
    budget_s = opts.time_budget_min * 60 if opts.time_budget_min else math.inf

    while True:
        epoch = state["epoch"]
        progress = max(epoch / opts.epochs, state["elapsed"] / budget_s)
        last_epoch_s = state["log"][-1]["epoch_s"] if state["log"] else 0.0
        if progress >= 1 or state["elapsed"] + last_epoch_s > budget_s:  # do not start an epoch that overruns
            break
        lr = poly_lr(opts.initial_lr, progress)
        for g in optimizer.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        seed = _epoch_seed(opts.seed, fold, epoch, rank)
        train_loader = BatchLoader(data_folder, train_ids, config, scales, batch, seed, workers, True, regions)
        val_loader = BatchLoader(data_folder, val_ids, config, scales, batch, seed + 1, 0, False, regions)
        try:
            train_loss = train_steps(model, loss_fn, optimizer, train_loader, opts.iters_per_epoch, device,
                                      amp_dtype, scaler, opts.grad_clip)
            val_loss, counts = _val_epoch(model, loss_fn, val_loader, opts.val_iters, device, amp_dtype,
                                          regions is not None, n_out)
        finally:
            train_loader.close()
            val_loader.close()
        if world > 1:
            packed = torch.cat([torch.tensor([train_loss, val_loss], dtype=torch.float64), counts.flatten()])
            dist.all_reduce(packed)
            train_loss, val_loss = float(packed[0]) / world, float(packed[1]) / world
            counts = packed[2:].reshape(counts.shape)
        dice = pseudo_dice(counts)
        seen = [d for d in dice if not math.isnan(d)]
        mean = float(np.mean(seen)) if seen else 0.0
        state["ema"] = mean if state["ema"] is None else EMA_DECAY * state["ema"] + (1 - EMA_DECAY) * mean
        epoch_s = time.perf_counter() - t0
        state["elapsed"] += epoch_s
        state["epoch"] = epoch + 1
        record = {"epoch": epoch, "train_loss": round(train_loss, 5), "val_loss": round(val_loss, 5),
                  "pseudo_dice": [round(d, 4) for d in dice], "ema_dice": round(state["ema"], 4),
                  "lr": lr, "epoch_s": round(epoch_s, 2)}
        state["log"].append(record)
        if rank == 0:
            improved = state["ema"] > state["best"]
            if improved:
                state["best"] = state["ema"]
                save_checkpoint(out, "best", _unwrap(model))
            save_checkpoint(out, "latest", _unwrap(model), {
                **state, "model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "optimizer_name": opts.optimizer,
                "torch_rng": torch.get_rng_state(),
            })
            _write_log(out, state["log"])
            dice_txt = " ".join("  nan" if math.isnan(d) else f"{d:.3f}" for d in dice)
            print(f"epoch {epoch:4d}  train {train_loss:.4f}  val {val_loss:.4f}  pseudo-Dice [{dice_txt}]  "
                  f"EMA {state['ema']:.4f}{' *' if improved else ''}  lr {lr:.5f}  {epoch_s:.1f}s", flush=True)
    if rank == 0:
        save_checkpoint(out, "final", _unwrap(model))
        if opts.validate:
            summary = validate_fold(model, data_folder, out, val_ids, config, meta,
                                    roots.raw / dataset / "labelsTr", rco, device, opts.save_probabilities)
            print(f"validation mean Dice per label: {summary['mean_dice']}")
    if world > 1:
        dist.barrier()
    return out
