"""``autoseg import-nnunet``: an nnU-Net v2 trained model as an autoseg model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..nnunet import CHECKPOINTS, CONFIGURATIONS, import_nnunet
from .common import env_roots, fold_name


def run_import_nnunet(args: argparse.Namespace) -> int:
    """Run ``autoseg import-nnunet``; returns the exit status."""
    target = import_nnunet(args.model_folder, env_roots().results, args.configuration, args.folds, args.checkpoint,
                           args.overwrite)
    print(f"imported {args.model_folder} into {target}")
    print(f"  predict with: autoseg predict -d {target.parent.name} -c {target.name} -i IMAGES -o OUT")
    return 0


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``autoseg import-nnunet``."""
    p = subparsers.add_parser(
        "import-nnunet", help="convert a trained nnU-Net v2 model folder into an autoseg model",
        description="Convert an nnU-Net v2 trainer folder (plans.json, dataset.json, fold_<k>/checkpoint_final.pth; "
        "PlainConvUNet or ResidualEncoderUNet) into AUTOSEG_RESULTS/DATASET/CONFIGURATION: the architecture and "
        "preprocessing from its plans, the weights as safetensors. Checkpoints are read with weights_only=True "
        "(numpy scalars allow-listed, anything else refused); what autoseg's U-Net cannot compute exactly is "
        "refused by name.",
    )
    p.add_argument("model_folder", type=Path, metavar="MODEL_FOLDER",
                   help="nnU-Net trainer folder, e.g. nnUNet_results/Dataset501_X/nnUNetTrainer__nnUNetPlans__3d_fullres")
    p.add_argument("-c", "--configuration", choices=list(CONFIGURATIONS), default=None,
                   help="configuration to import (default: the folder name's last '__' part)")
    p.add_argument("-f", "--folds", nargs="+", type=fold_name, default=None,
                   help="folds to import, e.g. 0 1 or all (default: every fold with the checkpoint)")
    p.add_argument("--checkpoint", choices=list(CHECKPOINTS), default="final",
                   help="which nnU-Net checkpoint to convert: final (default) or best (checkpoint_best.pth)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing AUTOSEG_RESULTS/DATASET/CONFIGURATION")
    p.set_defaults(func=run_import_nnunet)
    return p
