"""The ``autoseg`` command: argparse subcommands; the only place that reads ``sys.argv`` and the environment."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .errors import AutosegError

DEFAULT_WORKERS = max(1, min(4, os.cpu_count() or 1))


def _plan_device(choice: str) -> str:
    """``auto`` plans for a GPU when this machine has one, else for the CPU."""
    if choice != "auto":
        return choice
    import torch

    device = "gpu" if torch.cuda.is_available() else "cpu"
    print(f"planning for {device.upper()} training (--device {device}); pass --device to choose")
    return device


def _add_device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "gpu", "cpu"], default="auto",
                   help="what training will run on: gpu fits patch and batch to --gpu-memory-gb; cpu sizes the "
                   "network for compute (8 base features, ~64^3 patch); auto picks gpu if CUDA is available")
    p.add_argument("--gpu-memory-gb", type=float, default=8.0,
                   help="training memory budget the patch and batch size are fitted to (default 8)")


def _plan_and_preprocess(args: argparse.Namespace) -> int:
    from .atomic import write_json
    from .dataset_io import check_dataset, list_cases, load_dataset_json
    from .fingerprint import compute_fingerprint
    from .paths import Roots, dataset_name
    from .planner import plan
    from .preprocess import preprocess_dataset
    from .schemas import validate

    roots = Roots.from_env()
    name = dataset_name(args.dataset, roots.raw)
    raw, out = roots.raw / name, roots.preprocessed / name
    meta = check_dataset(raw, num_workers=args.num_workers) if args.verify else load_dataset_json(raw)
    cases = list_cases(raw, meta)
    fp_path = out / "fingerprint.json"
    fingerprint = json.loads(fp_path.read_text()) if fp_path.is_file() else None
    if fingerprint is None or [c["case"] for c in fingerprint["cases"]] != [c.case_id for c in cases]:
        fingerprint = compute_fingerprint(name, meta, cases, args.num_workers)
        write_json(fp_path, fingerprint)
    else:
        validate(fingerprint, "fingerprint", str(fp_path))
        print(f"reusing {fp_path} (same {len(cases)} cases); delete it to recompute")
    plans = plan(fingerprint, args.gpu_memory_gb, _plan_device(args.device))
    write_json(out / "plans.json", plans)
    write_json(out / "dataset.json", meta)
    wanted = [c for c in args.configurations if c in plans["configurations"]]
    for c in sorted(set(args.configurations) - set(wanted)):
        print(f"{c}: not planned for this dataset (see notes in {out / 'plans.json'})")
    preprocess_dataset(cases, plans, wanted, out, args.num_workers)
    print(f"\nplans: {out / 'plans.json'}")
    print(f"{'configuration':<13} {'spacing (z,y,x) mm':<26} {'patch':<16} {'batch':>5} {'stages':>6} {'est. GB':>7}")
    for c in wanted:
        cfg = plans["configurations"][c]
        spacing = ", ".join(f"{s:.3g}" for s in cfg["spacing"])
        patch = "x".join(map(str, cfg["patch_size"]))
        print(f"{c:<13} {spacing:<26} {patch:<16} {cfg['batch_size']:>5} {len(cfg['network']['strides']):>6} "
              f"{cfg['estimated_memory_gb']:>7.2f}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .atomic import write_json
    from .planner import plan
    from .schemas import validate

    try:
        fingerprint = json.loads(Path(args.fingerprint).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AutosegError(f"{args.fingerprint}: cannot read fingerprint JSON ({e})") from None
    validate(fingerprint, "fingerprint", args.fingerprint)
    write_json(args.output, plan(fingerprint, args.gpu_memory_gb, _plan_device(args.device)))
    print(f"wrote {args.output}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .paths import Roots, dataset_name
    from .trainer import TrainOptions, train_fold

    roots = Roots.from_env()
    name = dataset_name(args.dataset, roots.preprocessed if not roots.raw.is_dir() else roots.raw)
    opts = TrainOptions(
        epochs=args.epochs, iters_per_epoch=args.iters_per_epoch, val_iters=args.val_iters,
        time_budget_min=args.time_budget, device=args.device, encoder=args.encoder, seed=args.seed,
        continue_training=args.continue_training, validate=args.validate, num_workers=args.num_workers,
    )
    fold = args.fold if args.fold == "all" else int(args.fold)
    out = train_fold(name, args.configuration, fold, opts, roots)
    print(f"trained model: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import phantom

    parser = argparse.ArgumentParser(
        prog="autoseg",
        description="Self-configuring segmentation for CT (nnU-Net v2 dataset layout). Folders come from "
        "AUTOSEG_RAW, AUTOSEG_PREPROCESSED and AUTOSEG_RESULTS (defaults: ./autoseg_raw, ./autoseg_preprocessed, "
        "./autoseg_results).",
    )
    parser.add_argument("--version", action="version", version=f"autoseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "plan_and_preprocess",
        help="fingerprint a raw dataset, plan the configurations and preprocess the training cases",
        description="Fingerprint AUTOSEG_RAW/DATASET, write plans.json and preprocess every training case into "
        "AUTOSEG_PREPROCESSED/DATASET. Finished cases are skipped on a rerun; a changed plan reprocesses them.",
    )
    p.add_argument("-d", "--dataset", required=True, help="dataset id (501) or folder name (Dataset501_Name)")
    p.add_argument(
        "-c", "--configurations", nargs="+", default=["2d", "3d_fullres", "3d_lowres"],
        choices=["2d", "3d_fullres", "3d_lowres"],
        help="configurations to preprocess (default: all planned; 2d reuses the 3d_fullres data)",
    )
    p.add_argument("-np", "--num-workers", type=int, default=DEFAULT_WORKERS,
                   help=f"worker processes, one case each in memory (default {DEFAULT_WORKERS})")
    p.add_argument("--verify", action="store_true",
                   help="check every file first (geometry, labels, NaN, dimensionality) and report all problems")
    _add_device_flags(p)
    p.set_defaults(func=_plan_and_preprocess)

    p = sub.add_parser("plan", help="plans from a fingerprint file (the planner alone, no data needed)",
                       description="Run the planner on a fingerprint.json and write plans.json; used to regenerate "
                       "the golden plans in plans/ (make goldens) and to re-plan for another memory budget.")
    p.add_argument("-f", "--fingerprint", required=True, help="fingerprint.json to plan from")
    p.add_argument("-o", "--output", required=True, help="plans.json to write")
    _add_device_flags(p)
    p.set_defaults(func=_plan)

    p = sub.add_parser(
        "train", help="train one fold of one configuration",
        description="Train a U-Net built from the plans on preprocessed data. Checkpoints every epoch to "
        "AUTOSEG_RESULTS/DATASET/CONFIG/fold_F; --continue resumes exactly where the last finished epoch left off.",
    )
    p.add_argument("-d", "--dataset", required=True, help="dataset id (501) or folder name (Dataset501_Name)")
    p.add_argument("-c", "--configuration", default="3d_fullres", choices=["2d", "3d_fullres", "3d_lowres"],
                   help="planned configuration to train (default 3d_fullres)")
    p.add_argument("-f", "--fold", required=True, choices=["0", "1", "2", "3", "4", "all"],
                   help="cross-validation fold 0-4 (splits.json, fixed seed, user-editable) or 'all' cases")
    p.add_argument("--epochs", type=int, default=1000, help="epochs (default 1000)")
    p.add_argument("--iters-per-epoch", type=int, default=250, help="training iterations per epoch (default 250)")
    p.add_argument("--val-iters", type=int, default=50, help="validation patches batches per epoch (default 50)")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="stop after this many minutes of training; the learning-rate schedule is scaled to it")
    p.add_argument("--continue", dest="continue_training", action="store_true",
                   help="resume from checkpoint_latest (same optimizer, schedule, RNG and epoch)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to train (default: cuda if available)")
    p.add_argument("--encoder", choices=["plain", "residual"], default=None,
                   help="override the plan's encoder (residual: ResEnc-style residual blocks)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and data sampling (default 0)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="background data-loading processes (default: cores - 2, at most 8; 0 = in-process)")
    p.add_argument("--no-validation", dest="validate", action="store_false",
                   help="skip predicting the fold's validation cases at the end")
    p.set_defaults(func=_train)

    phantom.add_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AutosegError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; finished work is kept and a rerun continues from there", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
