"""``autoseg export`` and ``autoseg import``: model bundles on the command line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..bundle import DEFAULT_MAX_BYTES, FINAL, MANIFEST, fold_sort_key, import_bundle, write_bundle
from ..jsonfile import read_json
from ..layout import FINGERPRINT_JSON, dataset_name
from .common import env_roots, positive_float


def _summary(selection: dict[str, list[str]]) -> str:
    return "; ".join(f"{c} fold(s) {', '.join(f)}" for c, f in selection.items())


def _human(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def run_export(args: argparse.Namespace) -> int:
    """Run ``autoseg export``; returns the exit status."""
    roots = env_roots()
    name = dataset_name(args.dataset, roots.results)
    fingerprint = roots.preprocessed / name / FINGERPRINT_JSON
    use_fp = not args.no_fingerprint and fingerprint.is_file()
    manifest = write_bundle(roots.results / name, args.output, args.configurations, args.folds,
                            fingerprint if use_fp else None, args.onnx)
    size = sum(e["bytes"] for e in manifest["files"].values())
    print(f"wrote {args.output}: {name}, {_summary(manifest['selection'])} "
          f"({len(manifest['files'])} files, {_human(size)} unpacked)")
    print(f"  fingerprint: {fingerprint if use_fp else 'not included'}")
    if "onnx" in manifest:
        onnx = manifest["onnx"]
        for rel, diff in onnx["max_abs_logit_diff"].items():
            print(f"  {rel}: ONNX opset {onnx['opset']}, max |logit - torch| {diff:.2g} ({onnx['checked_with']})")
    return 0


def run_import(args: argparse.Namespace) -> int:
    """Run ``autoseg import``; returns the exit status."""
    roots = env_roots()
    folder = import_bundle(args.bundle, roots.results, max_bytes=int(args.max_gb * 2**30), overwrite=args.overwrite)
    manifest = read_json(folder / MANIFEST, "import the bundle again with --overwrite")
    folds: dict[str, list[str]] = {}
    for rel in manifest["files"]:
        parts = rel.split("/")
        if len(parts) == 3 and parts[2] == FINAL:
            folds.setdefault(parts[0], []).append(parts[1].removeprefix("fold_"))
    selection = {c: sorted(f, key=fold_sort_key) for c, f in sorted(folds.items())}
    print(f"imported {args.bundle} into {folder}: {_summary(selection)} "
          f"(exported with autoseg {manifest['autoseg_version']} at {manifest['created_utc']})")
    return 0


def add_cli(subparsers: Any) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """Register ``autoseg export`` and ``autoseg import``."""
    p = subparsers.add_parser(
        "export", help="pack trained weights, plans and dataset.json into one model zip",
        description="Write AUTOSEG_RESULTS/DATASET as a model bundle: per configuration plans.json, dataset.json "
        "and each fold's checkpoint_final.safetensors, plus inference_plan.json and the fingerprint when present, "
        "and a manifest with SHA-256 hashes. Only final weights are packed; no pickles.",
    )
    p.add_argument("-d", "--dataset", required=True, help="dataset id (501) or folder name (Dataset501_Name)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="ZIP", help="bundle to write, e.g. model.zip")
    p.add_argument("-c", "--configurations", nargs="+", default=None, metavar="CONFIG",
                   help="configurations to pack (default: every one with at least one finished fold)")
    p.add_argument("-f", "--folds", nargs="+", default=None, metavar="FOLD",
                   help="folds to pack, e.g. 0 1 2 or all (default: every fold with checkpoint_final)")
    p.add_argument("--no-fingerprint", action="store_true",
                   help="leave out AUTOSEG_PREPROCESSED/DATASET/fingerprint.json (packed by default when present)")
    p.add_argument("--onnx", action="store_true",
                   help="also pack each fold's network as ONNX (fold_<k>/checkpoint_final.onnx: opset 17, dynamic "
                   "batch and spatial axes, input the preprocessed image, output logits), checked against torch on "
                   "a random tile; needs pip install 'autoseg[onnx]'")
    p.set_defaults(func=run_export)

    q = subparsers.add_parser(
        "import", help="unpack a model zip into AUTOSEG_RESULTS after checking it",
        description="Check a model bundle (paths, file kinds, sizes, manifest hashes, plans schema, safetensors "
        "headers) and install it as AUTOSEG_RESULTS/DATASET. Nothing is written unless every check passes.",
    )
    q.add_argument("bundle", type=Path, metavar="ZIP", help="model bundle written by autoseg export")
    q.add_argument("--overwrite", action="store_true",
                   help="replace an existing AUTOSEG_RESULTS/DATASET (the old folder is deleted after the swap)")
    q.add_argument("--max-gb", type=positive_float("4"), default=DEFAULT_MAX_BYTES / 2**30,
                   help=f"refuse bundles that unpack to more than this many GiB "
                   f"(default {DEFAULT_MAX_BYTES // 2**30})")
    q.set_defaults(func=run_import)
    return p, q
