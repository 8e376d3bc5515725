"""The stage commands: plan_and_preprocess, plan, train, predict, ensemble, find_best_configuration,
apply_postprocessing. Each parses its flags and calls the matching :mod:`autoseg.pipeline` function."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import pipeline
from ..atomic import write_json
from ..io.outputs import OUTPUT_FORMATS
from ..inference.engines import CHOICES
from ..jsonfile import read_json
from ..layout import PLANS_JSON
from ..parallel import DEFAULT_WORKERS
from ..planning.planner import plan
from ..precision import PRECISIONS
from ..training.trainer import TrainOptions
from .common import (
    CONFIGURATIONS, add_cluster_flag, add_device_flags, bounded_int, cluster_address, env_roots, fold_name,
    learning_rate, positive_float, step_fraction,
)


def _plan_and_preprocess(args: argparse.Namespace) -> int:
    planned = pipeline.plan_and_preprocess(env_roots(), args.dataset, args.configurations, args.num_workers,
                                           args.verify, args.gpu_memory_gb, args.device, cluster_address(args.cluster))
    print(f"\nplans: {planned.folder / PLANS_JSON}")
    print(f"{'configuration':<13} {'spacing (z,y,x) mm':<26} {'patch':<16} {'batch':>5} {'stages':>6} {'est. GB':>7}")
    for c in planned.configurations:
        cfg = planned.plans["configurations"][c]
        spacing = ", ".join(f"{s:.3g}" for s in cfg["spacing"])
        patch = "x".join(map(str, cfg["patch_size"]))
        print(f"{c:<13} {spacing:<26} {patch:<16} {cfg['batch_size']:>5} {len(cfg['network']['strides']):>6} "
              f"{cfg['estimated_memory_gb']:>7.2f}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    fingerprint = read_json(args.fingerprint, "-f takes a fingerprint.json written by `autoseg plan_and_preprocess`",
                            "fingerprint")
    write_json(args.output, plan(fingerprint, args.gpu_memory_gb, pipeline.planning_device(args.device)))
    print(f"wrote {args.output}")
    return 0


def _train(args: argparse.Namespace) -> int:
    opts = TrainOptions(
        epochs=args.epochs, iters_per_epoch=args.iters_per_epoch, val_iters=args.val_iters,
        time_budget_min=args.time_budget, device=args.device, encoder=args.encoder, seed=args.seed,
        optimizer=args.optimizer, lr=args.lr, precision=args.precision,
        continue_training=args.continue_training, validate=args.validate, num_workers=args.num_workers,
        save_probabilities=args.save_probabilities,
    )
    fold = args.fold if args.fold == "all" else int(args.fold)
    out = pipeline.train(env_roots(), args.dataset, args.configuration, fold, opts, args.init_from)
    print(f"trained model: {out}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    pipeline.predict(env_roots(), Path(args.input), Path(args.output), args.dataset, args.model, args.configuration,
                     args.folds, args.device, not args.no_tta, args.step, args.fast, args.save_probabilities,
                     args.overwrite, not args.no_postprocessing, args.precision, args.output_format, args.uncertainty,
                     cluster_address(args.cluster), args.cluster_workers, args.engine)
    print(f"predictions in {args.output}")
    return 0


def _ensemble(args: argparse.Namespace) -> int:
    n = pipeline.ensemble(args.input, Path(args.output), args.dataset_json, args.save_probabilities)
    print(f"ensembled {n} case(s) into {args.output}")
    return 0


def _find_best(args: argparse.Namespace) -> int:
    inference_plan, path = pipeline.find_best(env_roots(), args.dataset)
    print(f"{'candidate':<28} mean foreground Dice ({inference_plan['cases']} validation cases)")
    for cand, score in sorted(inference_plan["mean_foreground_dice"].items(), key=lambda kv: -kv[1]):
        print(f"{cand:<28} {score:.4f}")
    for note in inference_plan["notes"]:
        print(note)
    print(f"wrote {path} (used by `autoseg predict -d {path.parent.name}`)")
    return 0


def _apply_postprocessing(args: argparse.Namespace) -> int:
    n = pipeline.postprocess_folder(env_roots(), args.dataset, Path(args.input), Path(args.output))
    print(f"postprocessed {n} file(s) into {args.output}")
    return 0


def add_cli(sub: Any) -> None:
    """Register the stage commands: plan_and_preprocess, plan, train, predict, ensemble, find_best_configuration,
    apply_postprocessing."""
    p = sub.add_parser(
        "plan_and_preprocess",
        help="fingerprint a raw dataset, plan the configurations and preprocess the training cases",
        description="Fingerprint AUTOSEG_RAW/DATASET, write plans.json and preprocess every training case into "
        "AUTOSEG_PREPROCESSED/DATASET. Finished cases are skipped on a rerun; a changed plan reprocesses them.",
    )
    p.add_argument("-d", "--dataset", required=True, help="dataset id (501) or folder name (Dataset501_Name)")
    p.add_argument(
        "-c", "--configurations", nargs="+", default=CONFIGURATIONS,
        choices=CONFIGURATIONS,
        help="configurations to preprocess (default: all planned; 2d and 3d_cascade reuse the 3d_fullres data, "
        "3d_cascade also needs its 3d_lowres stage)",
    )
    p.add_argument("-np", "--num-workers", type=bounded_int(1, 256, "2"), default=DEFAULT_WORKERS,
                   help=f"worker processes, one case each in memory (default {DEFAULT_WORKERS})")
    p.add_argument("--verify", action="store_true",
                   help="check every file first (geometry, labels, NaN, dimensionality) and report all problems")
    add_device_flags(p)
    add_cluster_flag(p)
    p.set_defaults(func=_plan_and_preprocess)

    p = sub.add_parser("plan", help="plans from a fingerprint file (the planner alone, no data needed)",
                       description="Run the planner on a fingerprint.json and write plans.json; used to regenerate "
                       "the golden plans in plans/ (make goldens) and to re-plan for another memory budget.")
    p.add_argument("-f", "--fingerprint", required=True, help="fingerprint.json to plan from")
    p.add_argument("-o", "--output", required=True, help="plans.json to write")
    add_device_flags(p)
    p.set_defaults(func=_plan)

    p = sub.add_parser(
        "train", help="train one fold of one configuration",
        description="Train a U-Net built from the plans on preprocessed data. Checkpoints every epoch to "
        "AUTOSEG_RESULTS/DATASET/CONFIG/fold_F; --continue resumes exactly where the last finished epoch left off.",
    )
    p.add_argument("-d", "--dataset", required=True, help="dataset id (501) or folder name (Dataset501_Name)")
    p.add_argument("-c", "--configuration", default="3d_fullres", choices=CONFIGURATIONS,
                   help="planned configuration to train (default 3d_fullres)")
    p.add_argument("-f", "--fold", required=True, choices=["0", "1", "2", "3", "4", "all"],
                   help="cross-validation fold 0-4 (splits.json: nnU-Net v2's folds, user-editable) or 'all' cases")
    p.add_argument("--epochs", type=bounded_int(1, example="50"), default=1000, help="epochs (default 1000)")
    p.add_argument("--iters-per-epoch", type=bounded_int(1, example="250"), default=250, help="training iterations per epoch (default 250)")
    p.add_argument("--val-iters", type=bounded_int(1, example="50"), default=50, help="validation patches batches per epoch (default 50)")
    p.add_argument("--time-budget", type=positive_float("30"), default=None, metavar="MINUTES",
                   help="stop after this many minutes of training; the learning-rate schedule is scaled to it")
    p.add_argument("--continue", dest="continue_training", action="store_true",
                   help="resume from checkpoint_latest (same optimizer, schedule, RNG and epoch)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to train (default: cuda if available)")
    p.add_argument("--encoder", choices=["plain", "residual"], default=None,
                   help="override the plan's encoder (residual: ResEnc-style residual blocks)")
    p.add_argument("--seed", type=bounded_int(0, 2**32 - 1, "0"), default=0,
                   help="seed for weights and data sampling (default 0)")
    p.add_argument("--optimizer", choices=["auto", "sgd", "adamw"], default="auto",
                   help="auto (default): AdamW with warm-up when the budget holds fewer than 20,000 iterations "
                   "(estimated from the measured step time), else SGD Nesterov as nnU-Net; sgd or adamw force one")
    p.add_argument("--lr", type=learning_rate, default=None,
                   help="initial learning rate, decayed by the poly schedule (default: 0.01 for sgd, 0.003 for adamw)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto (default): time a few real steps in float32 and, where the hardware has it, bfloat16 "
                   "(fp16 on GPUs without bf16), with and without channels-last, and train in the fastest sound one; "
                   "the others force a mode (fp16 only on CUDA)")
    p.add_argument("--num-workers", type=bounded_int(0, 64, "2"), default=None,
                   help="background data-loading processes (default: cores - 2, at most 8; 0 = in-process)")
    p.add_argument("--init-from", type=Path, default=None, metavar="MODEL",
                   help="start from the weights of another model where they fit: a bundle .zip, an autoseg results "
                   "folder (dataset, configuration or fold) or an nnU-Net v2 trainer folder; tensors of another "
                   "shape (a head for other labels, another number of input channels) keep their initialisation "
                   "and are listed; a network of other dims, stages, features, kernels or strides is refused. "
                   "Ignored with --continue")
    p.add_argument("--no-validation", dest="validate", action="store_false",
                   help="skip predicting the fold's validation cases at the end")
    p.add_argument("--npz", dest="save_probabilities", action="store_true",
                   help="save validation probabilities too (needed to score ensembles in find_best_configuration)")
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "predict", help="segment a folder of images with a trained model",
        description="Predict every image of a folder, a single image file, or a DICOM series folder or zip. "
        "Default model: the inference_plan.json written by "
        "find_best_configuration, else 3d_fullres with every trained fold. Finished cases are skipped unless "
        "--overwrite; bad cases are reported by name and the exit code is non-zero.",
    )
    p.add_argument("-i", "--input", required=True,
                   help="a folder of images (CASE_0000.nii.gz, ...; any name for one-channel models), one image "
                   "file, or a DICOM series folder or zip (one output per SeriesInstanceUID)")
    p.add_argument("-o", "--output", required=True, help="folder for the label maps (created)")
    p.add_argument("-d", "--dataset", help="dataset id or name whose trained models to use")
    p.add_argument("-m", "--model", help="a model bundle (.zip from `autoseg export`) instead of -d")
    p.add_argument("-c", "--configuration", choices=CONFIGURATIONS,
                   help="configuration to use (default: inference_plan.json, else 3d_fullres)")
    p.add_argument("-f", "--folds", nargs="+", type=fold_name, help="folds to average (default: every trained fold)")
    p.add_argument("--no-tta", action="store_true", help="no mirroring test-time augmentation (8x faster in 3D)")
    p.add_argument("--fast", action="store_true", help="one fold, no mirroring, step 0.75: fastest, a little less accurate")
    p.add_argument("--step", type=step_fraction, default=0.5, help="sliding-window step as a fraction of the patch (0.5)")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write CASE.npz with float16 probabilities and geometry (for `autoseg ensemble`)")
    p.add_argument("--no-postprocessing", action="store_true", help="skip the postprocessing of inference_plan.json")
    p.add_argument("--uncertainty", action="store_true",
                   help="also write OUT/uncertainty/: per case the predictive entropy, the folds' and mirrorings' "
                   "mutual information and each voxel's label probability (float NIfTI on the input's grid), and "
                   "CASE.json with the expected Dice per structure, lesion confidences and flag_for_review (by the "
                   "thresholds find_best_configuration calibrated on cross-validation)")
    p.add_argument("--overwrite", action="store_true",
                   help="predict cases again even if their output exists and was made by the same model (a case "
                   "predicted with another model or postprocessing is redone anyway; CASE.model.json says which)")
    p.add_argument("--output-format", choices=list(OUTPUT_FORMATS), default="nifti",
                   help="nifti (default): CASE.nii.gz label maps (the dataset's file ending); dicom-seg: CASE.dcm, "
                   "a DICOM Segmentation referring to the source series, one segment per label (DICOM input only; "
                   "needs the extra autoseg[dicom])")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to run (default auto)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="auto",
                   help="numeric mode of the network: auto (default) times a forward pass in float32 and, where the "
                   "hardware runs it natively, bfloat16 (fp16 on CUDA without bf16), with and without channels-last, "
                   "and uses the fastest numerically sound one; fp32/bf16/fp16 force it")
    add_cluster_flag(p)
    p.add_argument("--cluster-workers", type=bounded_int(1, 4096, "2"), default=None, metavar="N",
                   help="with --cluster: Ray workers (actors), each loading the model once and predicting one case at "
                   "a time (default: one per GPU of the cluster, else one per node; each reserves an equal share of "
                   "the CPUs)")
    p.add_argument("--engine", choices=list(CHOICES), default="torch",
                   help="what runs the network on each tile: torch (default); the network's ONNX export in "
                   "onnxruntime (pip install 'autoseg[onnx]') or openvino ('autoseg[openvino]'), float32, its "
                   "logits checked against torch's when loaded; or auto: time torch and every installed runtime on "
                   "the CPU and use the fastest (a runtime only if 1.15x faster; torch on a GPU or where none is "
                   "installed). Same sliding window, mirroring and weighting for all")
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
