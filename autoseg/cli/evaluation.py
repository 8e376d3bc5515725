"""``autoseg evaluate`` and ``autoseg report``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import pipeline
from ..evaluation.evaluate import format_summary
from ..evaluation.rendering import number_text
from ..parallel import DEFAULT_WORKERS
from .common import add_label_flags, env_roots, positive_int, tolerance


def add_evaluate_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``autoseg evaluate``."""
    p = subparsers.add_parser(
        "evaluate",
        help="compare predicted label maps with references: Dice, HD95, surface Dice, lesion detection",
        description="Evaluate PRED_DIR/CASE.nii.gz against REF_DIR/CASE.nii.gz for every reference case: per "
        "label and region (organ incl. tumour) Dice, IoU, sensitivity, precision, HD95, ASSD, surface Dice and "
        "volumes; per tumour label lesion-wise detection (IoU > 0.5 and any overlap) by lesion size. Writes "
        "evaluation.csv (one row per case and label/region), lesions.csv (one row per lesion) and summary.json.",
    )
    p.add_argument("-ref", "--ref", dest="ref", required=True, metavar="REF_DIR",
                   help="folder of reference label maps CASE<file_ending> (e.g. labelsTr/ or labelsTs/)")
    p.add_argument("-pred", "--pred", dest="pred", required=True, metavar="PRED_DIR",
                   help="folder of predicted label maps with the same file names and geometry")
    add_label_flags(p, "PRED_DIR or REF_DIR's parent (the raw dataset folder)")
    p.add_argument("-o", "--output", default=None, metavar="OUT_DIR",
                   help="where to write evaluation.csv, lesions.csv and summary.json (default: PRED_DIR)")
    p.add_argument("--tolerance-mm", type=tolerance, default=1.0,
                   help="surface Dice tolerance in mm (default 1.0)")
    p.add_argument("--surface-dice", choices=["voxel", "kits"], default="voxel",
                   help="kits: also the KiTS21/23 official Dice and area-weighted surface Dice of kidney+masses, "
                   "masses and tumour at the challenges' tolerances (needs autoseg[kits]); voxel: only autoseg's "
                   "voxel-count surface Dice at --tolerance-mm (default)")
    p.add_argument("-np", "--num-workers", type=positive_int, default=DEFAULT_WORKERS,
                   help=f"worker processes, one case each in memory (default {DEFAULT_WORKERS})")
    p.set_defaults(func=run_evaluate)
    return p


def run_evaluate(args: argparse.Namespace) -> int:
    """Run ``autoseg evaluate``; returns the exit status."""
    summary, out = pipeline.evaluate(env_roots(), args.ref, args.pred, args.output, args.dataset, args.labels,
                                     args.tolerance_mm, args.num_workers, args.surface_dice == "kits")
    print(format_summary(summary))
    if summary["unmatched_predictions"]:
        print(f"\nignored {len(summary['unmatched_predictions'])} prediction(s) without a reference: "
              f"{', '.join(summary['unmatched_predictions'])}")
    print(f"\nwrote {out / 'evaluation.csv'}, {out / 'lesions.csv'}, {out / 'summary.json'}")
    return 0


def add_report_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``autoseg report``."""
    p = subparsers.add_parser(
        "report",
        help="per-case volumes, tumour counts and burden, lesion diameters and overlay images of predictions",
        description="Measure predicted label maps: organ and tumour volumes (mL), tumours per organ, per lesion "
        "volume, maximal axial diameter and centroid (LPS mm), liver tumour burden; write report.csv, "
        "report_lesions.csv, report.json, overlays/CASE.png and report.html.",
    )
    p.add_argument("-i", "--input", dest="input", required=True, metavar="PRED_DIR",
                   help="folder of predicted label maps CASE<file_ending>")
    p.add_argument("-images", "--images", dest="images", default=None, metavar="IMG_DIR",
                   help="folder with the CT images (CASE_0000<file_ending>, e.g. imagesTs/) to draw the labels over; "
                   "default: labels over black")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder to write the report into")
    add_label_flags(p, "PRED_DIR")
    p.add_argument("-np", "--num-workers", type=positive_int, default=DEFAULT_WORKERS,
                   help=f"worker processes, one case each in memory (default {DEFAULT_WORKERS})")
    p.set_defaults(func=run_report)
    return p


def run_report(args: argparse.Namespace) -> int:
    """Run ``autoseg report``; returns the exit status."""
    reports = pipeline.report(env_roots(), args.input, args.output, args.images, args.dataset, args.labels,
                              args.num_workers)
    n_lesions = sum(len(r["lesions"]) for r in reports)
    print(f"{len(reports)} case(s), {n_lesions} lesion(s)")
    for r in reports:
        counts = ", ".join(f"{o} {n}" for o, n in r["tumour_count"].items())
        burden = r["liver_tumour_burden"]
        print(f"  {r['case']}: tumours {counts or '-'}; liver tumour burden {number_text(burden, '.3f')}")
    print(f"wrote {Path(args.output) / 'report.html'} (and report.csv, report_lesions.csv, report.json)")
    return 0
