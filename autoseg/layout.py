"""Where datasets, preprocessed data and results live, and every file name inside them.

Raw (nnU-Net v2)::  <raw>/<dataset>/dataset.json, imagesTr/CASE_XXXX<ending>, labelsTr/CASE<ending>, imagesTs/, labelsTs/
Preprocessed::      <preprocessed>/<dataset>/fingerprint.json, sources.json, plans.json, dataset.json,
                    <data_identifier>/CASE.npy, CASE_seg.npy, CASE_fg.npz, CASE.json
Results::           <results>/<dataset>/splits.json, inference_plan.json, <configuration>/plans.json, dataset.json,
                    fold_<k>/checkpoint_{latest,best,final}.safetensors, checkpoint_latest.state.pt, training_setup.json, log.jsonl,
                    progress.png, validation/CASE<ending>, validation/CASE.npz, validation/summary.json
Predictions::       <out>/CASE<ending> or CASE.dcm (DICOM-SEG), CASE.npz, CASE.model.json (the model that made them),
                    <out>/uncertainty/CASE_{entropy,mutual_information,probability}<ending>, uncertainty/CASE.json
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .errors import AutosegError

_DATASET_RE = re.compile(r"^Dataset(\d{3})_[A-Za-z0-9_\-]+$")
_SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class Roots:
    """The three top-level folders; defaults sit under the working directory."""

    raw: Path
    preprocessed: Path
    results: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str], cwd: Path | None = None) -> "Roots":
        """From ``AUTOSEG_RAW``/``AUTOSEG_PREPROCESSED``/``AUTOSEG_RESULTS`` in ``env`` (the CLI passes the process
        environment), else folders under ``cwd``."""
        cwd = Path.cwd() if cwd is None else cwd
        return cls(
            raw=Path(env.get("AUTOSEG_RAW", cwd / "autoseg_raw")),
            preprocessed=Path(env.get("AUTOSEG_PREPROCESSED", cwd / "autoseg_preprocessed")),
            results=Path(env.get("AUTOSEG_RESULTS", cwd / "autoseg_results")),
        )


def dataset_name(spec: str, raw_root: Path) -> str:
    """Resolve ``501`` or ``Dataset501_Name`` to the folder name under ``raw_root``."""
    spec = str(spec).strip()
    if _DATASET_RE.match(spec):
        return spec
    if spec.isdigit():
        prefix = f"Dataset{int(spec):03d}_"
        matches = sorted(p.name for p in raw_root.glob(prefix + "*") if p.is_dir()) if raw_root.is_dir() else []
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise AutosegError(
                f"no dataset with id {spec} under {raw_root} (looked for {prefix}*); "
                "set AUTOSEG_RAW or pass the full folder name, e.g. -d Dataset501_Abdomen"
            )
        raise AutosegError(f"dataset id {spec} is ambiguous under {raw_root}: {', '.join(matches)}; pass the full name")
    raise AutosegError(f"'{spec}' is not a dataset id (e.g. 501) or name (e.g. Dataset501_Abdomen)")


def inside(folder: Path, name: str, source: str) -> Path:
    """``folder/name`` for a ``name`` taken from a JSON file, a bundle or a flag (``source`` says which), refused
    unless every component is a plain name (no ``..``, no absolute path, no drive) and the path, symlinks
    resolved, stays inside ``folder``: a file must not make autoseg read plans or weights from elsewhere."""
    parts = str(name).split("/")
    if not name or not all(_SAFE_PART.match(p) and len(p) <= 100 for p in parts):
        raise AutosegError(f"{source}: {name!r} is not a plain name inside {folder} (letters, digits, '_', '-', '.'; "
                           "no absolute path or '..'); use the folder's own name, e.g. 3d_fullres or 0")
    path = Path(folder).joinpath(*parts)
    if not path.resolve().is_relative_to(Path(folder).resolve()):
        raise AutosegError(f"{source}: {name!r} leads outside {folder} (through a symbolic link); refusing it")
    return path


# Raw dataset
DATASET_JSON = "dataset.json"
IMAGES_TR, LABELS_TR, IMAGES_TS, LABELS_TS = "imagesTr", "labelsTr", "imagesTs", "labelsTs"

# Preprocessed dataset
FINGERPRINT_JSON = "fingerprint.json"
SOURCES_JSON = "sources.json"  # size and mtime of every raw file the fingerprint was computed from
PLANS_JSON = "plans.json"

# Results
SPLITS_JSON = "splits.json"
INFERENCE_PLAN_JSON = "inference_plan.json"
STATE_SUFFIX = ".state.pt"
LOG_JSONL = "log.jsonl"
TRAINING_SETUP_JSON = "training_setup.json"  # measured precision, chosen schedule and the iteration estimate
PROGRESS_PNG = "progress.png"
VALIDATION = "validation"
SUMMARY_JSON = "summary.json"
# Predictions: predict -o OUT writes OUT/CASE<ending>; --uncertainty adds OUT/uncertainty/ (uncertainty_files)
UNCERTAINTY = "uncertainty"
UNCERTAINTY_MAPS = ("entropy", "mutual_information", "probability")


def uncertainty_files(case_id: str, ending: str) -> dict[str, str]:
    """File names inside ``OUT/uncertainty/`` of one case of ``predict --uncertainty``: a map per
    :data:`UNCERTAINTY_MAPS` entry (``CASE_entropy<ending>``, ...) and ``summary`` (``CASE.json``, written last)."""
    return {**{m: f"{case_id}_{m}{ending}" for m in UNCERTAINTY_MAPS}, "summary": f"{case_id}.json"}


# Predictions (autoseg predict -o)
DICOM_SEG_ENDING = ".dcm"  # CASE.dcm, a DICOM Segmentation (--output-format dicom-seg)


def model_record(case_id: str) -> str:
    """``CASE.model.json``: which model made a case's predictions (a rerun with another model redoes the case)."""
    return f"{case_id}.model.json"


def image_file(case_id: str, channel: int, ending: str) -> str:
    """``CASE_XXXX<ending>``: one channel of a raw image."""
    return f"{case_id}_{channel:04d}{ending}"


PREPROCESSED_SUFFIXES = {"data": ".npy", "seg": "_seg.npy", "fg": "_fg.npz", "props": ".json"}


def preprocessed_files(case_id: str) -> dict[str, str]:
    """File names of one preprocessed case: image (``data``), labels (``seg``), foreground samples (``fg``) and
    properties (``props``, written last: its presence marks a finished case)."""
    return {kind: f"{case_id}{suffix}" for kind, suffix in PREPROCESSED_SUFFIXES.items()}


def fold_dir(config_dir: Path, fold: int | str) -> Path:
    """``<configuration>/fold_<k>``."""
    return config_dir / f"fold_{fold}"


def checkpoint_name(which: str) -> str:
    """``checkpoint_<which>.safetensors`` (``latest``, ``best`` or ``final``): weights only."""
    return f"checkpoint_{which}.safetensors"


def onnx_name(which: str) -> str:
    """``checkpoint_<which>.onnx``: the network of ``checkpoint_<which>.safetensors`` exported to ONNX (bundles made
    with ``export --onnx``)."""
    return f"checkpoint_{which}.onnx"


def checkpoint_file(fold_folder: Path, which: str) -> Path:
    """:func:`checkpoint_name` in a fold folder."""
    return fold_folder / checkpoint_name(which)


def state_file(fold_folder: Path, which: str = "latest") -> Path:
    """``checkpoint_<which>.state.pt``: weights, optimizer, schedule and RNG state for ``--continue``."""
    return fold_folder / f"checkpoint_{which}{STATE_SUFFIX}"


def trained_folds(config_dir: Path, which: str = "final") -> list[str]:
    """Fold ids (``"0"``, ``"all"``) under ``config_dir`` with a ``checkpoint_<which>``, sorted as strings."""
    return sorted(p.parent.name.removeprefix("fold_") for p in config_dir.glob(f"fold_*/{checkpoint_name(which)}"))
