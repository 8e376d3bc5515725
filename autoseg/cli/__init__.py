"""The ``autoseg`` command: argparse subcommands; the only place that reads ``sys.argv`` and the environment."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .. import __version__
from ..errors import AutosegError

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
    from ..atomic import write_json
    from ..io.images import check_dataset, images_in_folder, load_dataset_json
    from ..errors import DatasetError
    from ..planning.fingerprint import compute_fingerprint
    from ..layout import Roots, dataset_name
    from ..planning.planner import plan
    from ..preprocessing.preprocess import preprocess_dataset
    from ..schemas import validate

    roots = Roots.from_env()
    name = dataset_name(args.dataset, roots.raw)
    raw, out = roots.raw / name, roots.preprocessed / name
    warnings: list[str] = []
    meta = check_dataset(raw, warnings, num_workers=args.num_workers) if args.verify else load_dataset_json(raw)
    for w in warnings:  # allowed oddities found by --verify (e.g. an all-background label map)
        print(f"warning: {w}", file=sys.stderr)
    cases, problems = images_in_folder(raw / "imagesTr", meta["file_ending"], len(meta["channel_names"]),
                                       raw / "labelsTr")
    if problems:
        raise DatasetError(problems + ["run with --verify for a full check of every file"])
    fp_path = out / "fingerprint.json"
    try:
        fingerprint = json.loads(fp_path.read_text()) if fp_path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AutosegError(f"{fp_path}: not valid JSON ({e}); delete it to recompute the fingerprint") from None
    recorded = fingerprint.get("cases") if isinstance(fingerprint, dict) else None
    if not isinstance(recorded, list) or [c.get("case") if isinstance(c, dict) else None for c in recorded] != [
            c.case_id for c in cases]:  # absent, from other cases, or not a fingerprint: recompute
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
    from ..atomic import write_json
    from ..planning.planner import plan
    from ..schemas import validate

    try:
        fingerprint = json.loads(Path(args.fingerprint).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AutosegError(f"{args.fingerprint}: cannot read fingerprint JSON ({e})") from None
    validate(fingerprint, "fingerprint", args.fingerprint)
    write_json(args.output, plan(fingerprint, args.gpu_memory_gb, _plan_device(args.device)))
    print(f"wrote {args.output}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from ..training.trainer import TrainOptions, train_fold

    roots, name = _results_dataset(args.dataset)
    opts = TrainOptions(
        epochs=args.epochs, iters_per_epoch=args.iters_per_epoch, val_iters=args.val_iters,
        time_budget_min=args.time_budget, device=args.device, encoder=args.encoder, seed=args.seed,
        optimizer=args.optimizer, lr=args.lr,
        continue_training=args.continue_training, validate=args.validate, num_workers=args.num_workers,
        save_probabilities=args.save_probabilities,
    )
    fold = args.fold if args.fold == "all" else int(args.fold)
    out = train_fold(name, args.configuration, fold, opts, roots)
    print(f"trained model: {out}")
    return 0


def _results_dataset(spec: str) -> tuple[Any, str]:
    from ..layout import Roots, dataset_name

    roots = Roots.from_env()
    root = roots.raw if roots.raw.is_dir() else roots.results
    return roots, dataset_name(spec, root)


def _predict(args: argparse.Namespace) -> int:
    import shutil

    from ..inference.predictor import Predictor, predict_folder

    bundle_dir = None
    if args.model:
        from ..bundle import open_bundle

        dataset_dir = open_bundle(Path(args.model))
        bundle_dir = dataset_dir.parent
    elif args.dataset:
        roots, name = _results_dataset(args.dataset)
        dataset_dir = roots.results / name
    else:
        raise AutosegError("say which model to use: -d DATASET (trained here) or -m model.zip")
    try:
        inference_plan = dataset_dir / "inference_plan.json"
        postprocessing = None
        if args.configuration:
            configs, folds = [args.configuration], {args.configuration: args.folds}
        elif inference_plan.is_file():
            ip = json.loads(inference_plan.read_text())
            configs, folds, postprocessing = ip["configurations"], ip["folds"], ip["postprocessing"]
            print(f"using {inference_plan}: {'+'.join(configs)}, postprocessing {postprocessing}")
        else:
            configs, folds = ["3d_fullres"], {"3d_fullres": args.folds}
        if args.folds:
            folds = {c: args.folds for c in configs}
        mirror, step = not args.no_tta, args.step
        if args.fast:
            mirror, step = False, max(step, 0.75)
        predictors = []
        for c in configs:
            chosen = folds.get(c)
            if args.fast:
                chosen = (chosen or sorted(p.parent.name.removeprefix("fold_")
                                           for p in (dataset_dir / c).glob("fold_*/checkpoint_final.safetensors")))[:1]
            predictors.append(Predictor.from_trained(dataset_dir / c, chosen, device=args.device, mirror=mirror,
                                                     step=step))
        problems = predict_folder(predictors, Path(args.input), Path(args.output), args.save_probabilities,
                                  args.overwrite, postprocessing if not args.no_postprocessing else None)
    finally:
        if bundle_dir is not None:
            shutil.rmtree(bundle_dir, ignore_errors=True)
    if problems:
        from ..errors import DatasetError

        raise DatasetError(problems)
    print(f"predictions in {args.output}")
    return 0


def _ensemble(args: argparse.Namespace) -> int:
    from ..io.images import load_dataset_json
    from ..inference.ensemble import ensemble_folders
    from ..training.trainer import label_layout

    meta = load_dataset_json(Path(args.dataset_json).parent) if args.dataset_json else {"file_ending": ".nii.gz"}
    rco = label_layout(meta)[2] if args.dataset_json else None
    n = ensemble_folders([Path(d) for d in args.input], Path(args.output), meta["file_ending"], rco,
                         args.save_probabilities)
    print(f"ensembled {n} case(s) into {args.output}")
    return 0


def _find_best(args: argparse.Namespace) -> int:
    from ..atomic import write_json
    from ..inference.ensemble import find_best_configuration

    roots, name = _results_dataset(args.dataset)
    meta = json.loads((roots.preprocessed / name / "dataset.json").read_text())
    plan = find_best_configuration(roots.results / name, roots.raw / name / "labelsTr", meta)
    print(f"{'candidate':<28} mean foreground Dice ({plan['cases']} validation cases)")
    for cand, score in sorted(plan["mean_foreground_dice"].items(), key=lambda kv: -kv[1]):
        print(f"{cand:<28} {score:.4f}")
    for note in plan["notes"]:
        print(note)
    write_json(roots.results / name / "inference_plan.json", plan)
    print(f"wrote {roots.results / name / 'inference_plan.json'} (used by `autoseg predict -d {name}`)")
    return 0


def _apply_postprocessing(args: argparse.Namespace) -> int:
    from ..io.images import read_image, write_image
    from ..inference.postprocess import apply_postprocessing

    roots, name = _results_dataset(args.dataset)
    plan_path = roots.results / name / "inference_plan.json"
    if not plan_path.is_file():
        raise AutosegError(f"{plan_path} not found; run `autoseg find_best_configuration -d {name}` first")
    spec = json.loads(plan_path.read_text())["postprocessing"]
    files = sorted(p for p in Path(args.input).iterdir() if p.name.endswith((".nii.gz", ".nii", ".nrrd", ".mha")))
    for f in files:
        seg, geo = read_image(f)
        write_image(Path(args.output) / f.name, apply_postprocessing(seg, spec), geo)
    print(f"postprocessed {len(files)} file(s) into {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .. import bundle, demo, phantom
    from ..evaluation import evaluate, report

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
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd",
                   help="sgd: Nesterov, momentum 0.99, the nnU-Net choice for full-length runs (default); adamw: "
                   "reaches usable Dice in far fewer iterations, for budgets of minutes (the CPU demo)")
    p.add_argument("--lr", type=float, default=None,
                   help="initial learning rate, decayed by the poly schedule (default: 0.01 for sgd, 0.003 for adamw)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="background data-loading processes (default: cores - 2, at most 8; 0 = in-process)")
    p.add_argument("--no-validation", dest="validate", action="store_false",
                   help="skip predicting the fold's validation cases at the end")
    p.add_argument("--npz", dest="save_probabilities", action="store_true",
                   help="save validation probabilities too (needed to score ensembles in find_best_configuration)")
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "predict", help="segment a folder of images with a trained model",
        description="Predict every CASE_XXXX image in a folder. Default model: the inference_plan.json written by "
        "find_best_configuration, else 3d_fullres with every trained fold. Finished cases are skipped unless "
        "--overwrite; bad cases are reported by name and the exit code is non-zero.",
    )
    p.add_argument("-i", "--input", required=True, help="folder of images (CASE_0000.nii.gz, ...)")
    p.add_argument("-o", "--output", required=True, help="folder for the label maps (created)")
    p.add_argument("-d", "--dataset", help="dataset id or name whose trained models to use")
    p.add_argument("-m", "--model", help="a model bundle (.zip from `autoseg export`) instead of -d")
    p.add_argument("-c", "--configuration", choices=["2d", "3d_fullres", "3d_lowres"],
                   help="configuration to use (default: inference_plan.json, else 3d_fullres)")
    p.add_argument("-f", "--folds", nargs="+", help="folds to average (default: every trained fold)")
    p.add_argument("--no-tta", action="store_true", help="no mirroring test-time augmentation (8x faster in 3D)")
    p.add_argument("--fast", action="store_true", help="one fold, no mirroring, step 0.75: fastest, a little less accurate")
    p.add_argument("--step", type=float, default=0.5, help="sliding-window step as a fraction of the patch (0.5)")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write CASE.npz with float16 probabilities and geometry (for `autoseg ensemble`)")
    p.add_argument("--no-postprocessing", action="store_true", help="skip the postprocessing of inference_plan.json")
    p.add_argument("--overwrite", action="store_true", help="predict cases again even if their output exists")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to run (default auto)")
    p.set_defaults(func=_predict)

    p = sub.add_parser("ensemble", help="average saved probabilities of several predictions",
                       description="Average CASE.npz probabilities (from --save-probabilities) present in every "
                       "input folder and write label maps.")
    p.add_argument("-i", "--input", nargs="+", required=True, help="two or more prediction folders")
    p.add_argument("-o", "--output", required=True, help="folder for the ensembled label maps")
    p.add_argument("--dataset-json", help="dataset.json (file ending; regions_class_order of region-based models)")
    p.add_argument("--save-probabilities", action="store_true", help="also write the averaged probabilities")
    p.set_defaults(func=_ensemble)

    p = sub.add_parser("find_best_configuration", help="choose configuration/ensemble and postprocessing from CV",
                       description="Score every trained configuration and pairwise ensemble (needs train --npz) "
                       "on their validation predictions, choose postprocessing, write inference_plan.json.")
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    p.set_defaults(func=_find_best)

    p = sub.add_parser("apply_postprocessing", help="apply the chosen postprocessing to label maps made elsewhere",
                       description="Apply the postprocessing of AUTOSEG_RESULTS/DATASET/inference_plan.json.")
    p.add_argument("-i", "--input", required=True, help="folder of label maps")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    p.set_defaults(func=_apply_postprocessing)

    evaluate.add_cli(sub)
    report.add_cli(sub)
    demo.add_cli(sub)
    phantom.add_cli(sub)
    bundle.add_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AutosegError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # no permission, disk full, a file where a folder is expected, ...
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; check that the path exists, that every folder on it is a folder "
              "(not a file), that you may read and write there and that the disk has free space", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; finished work is kept and a rerun continues from there", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
