"""Raw datasets in the nnU-Net v2 layout: ``dataset.json``, and which files make up which case.

Every way of finding cases lives here: training/test images ``CASE_XXXX<ending>`` with their label files, label maps
``CASE<ending>`` in a folder (predictions, references), and a prediction's image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import AutosegError, DatasetError
from ..jsonfile import read_json
from ..labels import LabelSpec, check_labels, label_problems
from ..layout import DATASET_JSON, Roots, dataset_name, image_file
from .images import Geometry, read_image

_FILE_ENDING = re.compile(r"^(\.[A-Za-z0-9]+){1,3}$")
REQUIRED_KEYS = {"channel_names": dict, "labels": dict, "numTraining": int, "file_ending": str}
_KEY_EXAMPLES = {"channel_names": '{"0": "CT"}', "labels": '{"background": 0, "liver": 1}', "numTraining": "24",
                 "file_ending": '".nii.gz"'}  # shown in the fix of a missing or mistyped key


@dataclass(frozen=True)
class Case:
    """One case: its id, one image file per channel (in channel order) and the label file if any."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None



def load_dataset_json(folder: str | Path) -> dict[str, Any]:
    """Read and check ``dataset.json``; every problem is reported at once, naming the key and the fix."""
    path = Path(folder) / DATASET_JSON
    if not path.is_file():
        raise DatasetError([f"{path}: file not found; every dataset needs a dataset.json (nnU-Net v2 layout)"])
    try:
        meta = read_json(path, "fix the syntax (nnU-Net v2 dataset.json)")
    except AutosegError as e:
        raise DatasetError([str(e)]) from None
    problems = dataset_json_problems(meta, str(path))
    if problems:
        raise DatasetError(problems)
    return meta


def dataset_json_problems(meta: Any, path: str) -> list[str]:
    """Every problem of a parsed ``dataset.json`` (read from ``path``), each naming the key and the fix."""
    if not isinstance(meta, dict):
        return [f"{path}: top level must be an object, found {type(meta).__name__}"]
    problems = []
    for key, typ in REQUIRED_KEYS.items():
        if key not in meta:
            problems.append(f"{path}: required key '{key}' is missing; add it, e.g. \"{key}\": {_KEY_EXAMPLES[key]}")
        elif not isinstance(meta[key], typ) or (typ is int and isinstance(meta[key], bool)):
            problems.append(
                f"{path}: key '{key}' must be {typ.__name__}, found {type(meta[key]).__name__} ({meta[key]!r}); "
                f"e.g. \"{key}\": {_KEY_EXAMPLES[key]}"
            )
    if not problems:
        problems += [f"{path}: {p}" for p in label_problems(meta["labels"])]
        if not meta["channel_names"]:
            problems.append(f"{path}: 'channel_names' is empty; declare at least one channel, e.g. {{\"0\": \"CT\"}}")
        elif sorted(meta["channel_names"]) != [str(i) for i in range(len(meta["channel_names"]))]:
            problems.append(
                f"{path}: 'channel_names' keys must be '0'..'{len(meta['channel_names']) - 1}', "
                f"found {sorted(meta['channel_names'])}"
            )
        if not _FILE_ENDING.match(meta["file_ending"]):
            problems.append(f"{path}: 'file_ending' must start with '.', found {meta['file_ending']!r}; give a file "
                            "suffix of letters and digits such as \".nii.gz\"")
        if not problems and "regions_class_order" in meta:
            try:
                LabelSpec.from_meta(meta).layout()
            except AutosegError as e:
                problems.append(f"{path}: {str(e).removeprefix('dataset.json: ')}")
    return problems


def images_in_folder(
    image_dir: str | Path, ending: str, n_channels: int, label_dir: str | Path | None = None
) -> tuple[list[Case], list[str]]:
    """Cases in a folder of ``<CASE>_<XXXX><ending>`` files, and a problem line for each file that is not one and
    each case missing a channel (those cases are left out). Labels come from ``label_dir`` when given."""
    image_dir = Path(image_dir)
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
    ids: dict[str, dict[int, Path]] = {}
    problems = []
    for p in sorted(image_dir.iterdir()) if image_dir.is_dir() else []:
        m = pattern.match(p.name)
        if m and int(m.group(2)) < n_channels:
            ids.setdefault(m.group(1), {})[int(m.group(2))] = p
        elif not p.name.startswith("."):
            problems.append(f"{p}: not an image of the form CASE_XXXX{ending} with XXXX < {n_channels}; skipped")
    cases = []
    for case_id, channels in sorted(ids.items()):
        missing = [c for c in range(n_channels) if c not in channels]
        if missing:
            problems.append(f"case {case_id}: channel file(s) {[f'{case_id}_{c:04d}{ending}' for c in missing]} "
                            f"missing in {image_dir}; skipped")
            continue
        label = Path(label_dir) / f"{case_id}{ending}" if label_dir is not None else None
        cases.append(Case(case_id, tuple(channels[c] for c in range(n_channels)),
                          label if label is not None and label.is_file() else None))
    return cases, problems


def list_cases(folder: str | Path, meta: dict[str, Any], split: str = "Tr") -> list[Case]:
    """Complete cases in ``images<split>/`` (``Tr`` or ``Ts``) with their label files from ``labels<split>/``.

    Incomplete cases and stray files are left out here; :func:`verify_dataset` reports them.
    """
    folder = Path(folder)
    cases, _ = images_in_folder(folder / f"images{split}", meta["file_ending"], len(meta["channel_names"]),
                                folder / f"labels{split}")
    return cases


def case_signature(case: Case) -> dict[str, list[int]]:
    """``{file name: [size, mtime in ns]}`` of a case's image and label files: what a rerun compares to tell an
    edited or replaced input from the one its stored work was made from (reading every byte would cost minutes)."""
    files = list(case.images) + ([case.label] if case.label is not None else [])
    out = {}
    for p in files:
        st = p.stat()
        out[p.name] = [st.st_size, st.st_mtime_ns]
    return out


def read_case(case: Case) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """Read all channels as float32 (C, Z, Y, X), the label as uint8 (Z, Y, X) or None, and the first channel's
    geometry. Geometry agreement between channels and label is :func:`verify_dataset`'s job; shapes are checked here."""
    arrays, geometry = [], None
    for p in case.images:
        arr, geo = read_image(p)
        if geometry is not None and geo.shape != geometry.shape:
            raise AutosegError(f"{p}: shape {geo.shape} differs from channel 0 ({geometry.shape}) of case {case.case_id}")
        geometry = geometry or geo
        arrays.append(arr.astype(np.float32, copy=False))
    if geometry is None:
        raise AutosegError(f"case {case.case_id}: no image files")
    seg = None
    if case.label is not None:
        seg_arr, geo = read_image(case.label)
        if geo.shape != geometry.shape:
            raise AutosegError(
                f"{case.label}: label shape {geo.shape} differs from image shape {geometry.shape}; "
                "image and label must be on the same voxel grid"
            )
        if not np.issubdtype(seg_arr.dtype, np.integer):
            rounded = np.rint(seg_arr)
            if not np.array_equal(rounded, seg_arr):
                raise AutosegError(f"{case.label}: label map holds non-integer values; labels must be integers")
            seg_arr = rounded
        if seg_arr.min() < 0 or seg_arr.max() > 255:
            raise AutosegError(
                f"{case.label}: label values range {seg_arr.min()}..{seg_arr.max()}, outside 0..255"
            )
        seg = seg_arr.astype(np.uint8)
    return np.stack(arrays), seg, geometry


def case_files(folder: Path, ending: str) -> dict[str, Path]:
    """Label maps ``CASE<ending>`` in a folder (predictions or references): case id -> file, hidden files skipped."""
    return {
        p.name[: -len(ending)]: p
        for p in sorted(folder.iterdir())
        if p.name.endswith(ending) and len(p.name) > len(ending) and not p.name.startswith(".") and p.is_file()
    }


def find_image(folder: Path, case: str, ending: str) -> Path | None:
    """The image of a case for display: ``CASE_0000<ending>`` (channel 0), else ``CASE<ending>``."""
    for name in (image_file(case, 0, ending), f"{case}{ending}"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_labels_json(path: Path) -> dict[str, Any]:
    if path.is_dir() or path.name == DATASET_JSON:
        return load_dataset_json(path if path.is_dir() else path.parent)
    meta = read_json(path, "--labels takes a dataset.json or a JSON object with a 'labels' object")
    if not isinstance(meta, dict) or not isinstance(meta.get("labels"), dict):
        raise AutosegError(
            f"{path}: needs a 'labels' object like dataset.json's, e.g. {{\"background\": 0, \"liver\": 1}}"
        )
    try:
        check_labels(meta["labels"])
    except ValueError as e:
        raise AutosegError(f"{path}: {e}") from None
    return meta


def resolve_labels(
    roots: Roots, dataset: str | None, labels_path: str | Path | None, fallbacks: Sequence[Path] = ()
) -> tuple[dict[str, Any], str]:
    """``(labels, file_ending)`` from ``labels_path`` (a dataset.json or any JSON with ``labels``), else from
    ``dataset`` (``<raw>/<dataset>/dataset.json``), else from the first ``dataset.json`` found in ``fallbacks``."""
    if labels_path is not None:
        meta = _read_labels_json(Path(labels_path))
    elif dataset is not None:
        meta = load_dataset_json(roots.raw / dataset_name(dataset, roots.raw))
    else:
        found = [f for f in fallbacks if (f / DATASET_JSON).is_file()]
        if not found:
            looked = ", ".join(str(f / DATASET_JSON) for f in fallbacks) or "nowhere"
            raise AutosegError(f"no label definitions: pass -d DATASET or --labels dataset.json (looked in {looked})")
        meta = load_dataset_json(found[0])
    return dict(meta["labels"]), str(meta.get("file_ending", ".nii.gz"))
