"""``autoseg convert``: a public dataset's layout to the raw layout."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..io.convert import CONVERTERS, convert_dataset
from ..io.dataset import list_cases, load_dataset_json
from .common import env_roots


def _dataset_id(text: str) -> int:
    """argparse type: a dataset id 1-999."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a dataset id 1-999 (e.g. 220), got {text!r}") from None
    if not 1 <= v <= 999:
        raise argparse.ArgumentTypeError(f"dataset ids are 1-999, got {v}")
    return v


def _convert(args: argparse.Namespace) -> int:
    out = convert_dataset(args.dataset_kind, Path(args.source), env_roots().raw, args.dataset)
    meta = load_dataset_json(out)
    n_test = len(list_cases(out, meta, "Ts"))
    print(f"wrote {out}: {meta['numTraining']} training and {n_test} test case(s), labels {meta['labels']}")
    print(f"next: autoseg plan_and_preprocess -d {args.dataset} --verify")
    return 0


def add_cli(sub: Any) -> None:
    """Register ``autoseg convert``."""
    p = sub.add_parser(
        "convert", help="convert KiTS19, KiTS23, LiTS or MSD Task03_Liver to the raw (nnU-Net v2) layout",
        description="Copy a downloaded public dataset into AUTOSEG_RAW/DatasetID_Name with imagesTr/CASE_0000.nii.gz, "
        "labelsTr/CASE.nii.gz, imagesTs/ (cases without labels) and dataset.json. kits19: the repository's data/ "
        "(case_XXXXX/imaging.nii.gz, segmentation.nii.gz); kits23: its dataset/ (same files; labels as nnU-Net's "
        "KiTS2023 regions kidney+masses, masses, tumour); lits: volume-N.nii/segmentation-N.nii in any subfolder; "
        "msd-liver: the Task03_Liver folder. Files are copied byte for byte (geometry kept exactly).",
    )
    p.add_argument("dataset_kind", choices=sorted(CONVERTERS), metavar="{" + ",".join(sorted(CONVERTERS)) + "}",
                   help="which public dataset SOURCE holds")
    p.add_argument("source", metavar="SOURCE", help="the downloaded dataset folder")
    p.add_argument("-d", "--dataset", required=True, type=_dataset_id,
                   help="dataset id 1-999 for the new AUTOSEG_RAW/DatasetID_Name folder")
    p.set_defaults(func=_convert)
