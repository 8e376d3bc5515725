"""``--verify``: every problem of a raw training set, collected in one pass and reported together.

Dataset-level problems come first (folders, stray and orphan files, numTraining), then per case in sorted order:
missing channels or label, headers and geometry against the first channel, then voxel values one file at a time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..atomic import TMP_MARK
from ..errors import AutosegError, DatasetError
from ..labels import LabelSpec
from ..parallel import CaseMapper, map_cases
from .dataset import load_dataset_json
from .images import Geometry, read_header, read_image_scanned
from .nifti import nonfinite_counts


def check_dataset(
    folder: str | Path, warnings: list[str] | None = None, num_workers: int = 1, cluster: CaseMapper | None = None
) -> dict[str, Any]:
    """Load ``dataset.json`` and verify the whole dataset; raise :class:`DatasetError` with every problem, else
    return the metadata. Warnings (allowed oddities) are appended to ``warnings`` when given."""
    meta = load_dataset_json(folder)
    problems = verify_dataset(folder, meta, warnings=warnings, num_workers=num_workers, cluster=cluster)
    if problems:
        raise DatasetError(problems)
    return meta


def verify_dataset(
    folder: str | Path,
    meta: dict[str, Any] | None = None,
    warnings: list[str] | None = None,
    num_workers: int = 1,
    cluster: CaseMapper | None = None,
) -> list[str]:
    """All problems of the raw training set in ``folder`` (nnU-Net v2 layout); an empty list means it is usable.

    ``meta`` is ``dataset.json`` as returned by :func:`load_dataset_json` (read from ``folder`` when None; if that
    fails its problems are returned). Allowed oddities (an all-background label map) go to ``warnings`` when a list
    is given. Cases are checked one at a time (headers first, then voxels), in ``num_workers`` processes when > 1
    (on ``cluster`` when given);
    the output order is deterministic: dataset-level problems first, then per case in sorted case order.
    """
    folder = Path(folder)
    if meta is None:
        try:
            meta = load_dataset_json(folder)
        except DatasetError as e:
            return list(e.problems)
    ending = meta["file_ending"]
    channel_names = tuple(str(meta["channel_names"][str(i)]) for i in range(len(meta["channel_names"])))
    n_channels = len(channel_names)
    image_dir, label_dir = folder / "imagesTr", folder / "labelsTr"
    problems: list[str] = []
    if not image_dir.is_dir():
        return [
            f"imagesTr/: folder not found in {folder}; put the training images there as CASE_XXXX{ending} "
            f"(XXXX = 4-digit channel index, {n_channels} channel(s) declared in dataset.json)"
        ]

    image_re = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
    found: dict[str, dict[int, str]] = {}
    for p in sorted(image_dir.iterdir()):
        m = None if p.name.startswith(".") else image_re.match(p.name)  # hidden files are never cases
        if m and p.is_file():
            found.setdefault(m.group(1), {})[int(m.group(2))] = f"imagesTr/{p.name}"
        elif m:
            problems.append(f"imagesTr/{p.name}: is not a regular file; remove it from imagesTr/")
        else:
            problems.append(
                _stray(f"imagesTr/{p.name}", f"CASE_XXXX{ending} (CASE = case id, XXXX = 4-digit channel index; "
                       f"dataset.json file_ending is '{ending}')")
            )
    if not found:
        problems.insert(
            0,
            f"imagesTr/: holds no case (no file named CASE_XXXX{ending}) while dataset.json declares "
            f"numTraining={meta['numTraining']}; add the training images",
        )
    elif meta["numTraining"] != len(found):
        problems.insert(
            0,
            f"dataset.json: numTraining is {meta['numTraining']} but imagesTr/ holds {len(found)} case(s); "
            f"set numTraining to {len(found)} or add/remove cases",
        )

    by_lower: dict[str, list[str]] = {}
    for case_id in found:
        by_lower.setdefault(case_id.lower(), []).append(case_id)
    for ids in by_lower.values():
        if len(ids) > 1:
            problems.append(
                f"imagesTr/: duplicate case ids {', '.join(repr(i) for i in ids)} differ only in letter case; "
                "rename all but one (they collide on case-insensitive file systems)"
            )

    labels: dict[str, str] = {}
    if not label_dir.is_dir():
        if found:
            problems.append(
                f"labelsTr/: folder not found in {folder}; every training case needs a label map "
                f"labelsTr/CASE{ending}"
            )
    else:
        for p in sorted(label_dir.iterdir()):
            if not p.name.endswith(ending) or len(p.name) == len(ending) or p.name.startswith("."):
                problems.append(
                    _stray(f"labelsTr/{p.name}", f"CASE{ending} (dataset.json file_ending is '{ending}')")
                )
            elif not p.is_file():
                problems.append(f"labelsTr/{p.name}: is not a regular file; remove it from labelsTr/")
            else:
                case_id = p.name[: -len(ending)]
                if case_id in found:
                    labels[case_id] = f"labelsTr/{p.name}"
                    continue
                hint = ""
                m = re.match(r"^(.+)_\d{4}$", case_id)
                if m and m.group(1) in found:
                    hint = f" (label files carry no channel suffix: should it be labelsTr/{m.group(1)}{ending}?)"
                problems.append(
                    f"labelsTr/{p.name}: orphan label, no image imagesTr/{case_id}_0000{ending} for case "
                    f"'{case_id}'{hint}; add the case's images or remove the label"
                )

    declared, label_expected = tuple(LabelSpec.from_labels(meta["labels"]).values), label_dir.is_dir()
    tasks = [
        _CaseTask(
            folder=str(folder),
            case_id=case_id,
            ending=ending,
            channel_names=channel_names,
            channels=tuple(sorted(channels.items())),
            label=labels.get(case_id),
            label_expected=label_expected,
            declared=declared,
        )
        for case_id, channels in sorted(found.items())
    ]
    outcomes = map_cases(_verify_case, tasks, num_workers, desc="verify", progress=False,
                         initializer=_worker_init, cluster=cluster)
    for result, error in outcomes:
        if error is not None:
            problems.append(error)
            continue
        case_problems, case_warnings = result
        problems += case_problems
        if warnings is not None:
            warnings += case_warnings
    return problems


def _stray(rel: str, expected: str) -> str:
    if Path(rel).name.startswith(TMP_MARK):
        return f"{rel}: leftover temporary file of an interrupted write; delete it"
    return f"{rel}: stray file, not named {expected}; remove or rename it"


@dataclass(frozen=True)
class _CaseTask:
    """Everything one worker needs to check one case (picklable; paths relative to ``folder``)."""

    folder: str
    case_id: str
    ending: str
    channel_names: tuple[str, ...]
    channels: tuple[tuple[int, str], ...]
    label: str | None
    label_expected: bool
    declared: tuple[int, ...]


def _worker_init() -> None:
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)


def _verify_case(task: _CaseTask) -> tuple[list[str], list[str]]:
    """(problems, warnings) of one case: file presence, headers and geometry, then voxel values, one file at a time."""
    folder, cid, n = Path(task.folder), task.case_id, len(task.channel_names)
    problems: list[str] = []
    warnings: list[str] = []

    def err(e: AutosegError, rel: str) -> str:
        return str(e).replace(str(folder / rel), rel)

    channels: list[tuple[int, str]] = []
    present = dict(task.channels)
    for c in range(n):
        if c not in present:
            problems.append(
                f"case {cid}: channel {c} ('{task.channel_names[c]}') missing: expected imagesTr/{cid}_{c:04d}"
                f"{task.ending}; add the file (dataset.json declares {n} channel(s))"
            )
    for c, rel in task.channels:
        if c >= n:
            problems.append(
                f"{rel}: unexpected channel {c} for case {cid}: dataset.json declares {n} channel(s) "
                f"(indices 0..{n - 1}); remove the file or declare the channel in 'channel_names'"
            )
        else:
            channels.append((c, rel))
    if task.label is None and task.label_expected:
        problems.append(
            f"case {cid}: no label file, expected labelsTr/{cid}{task.ending}; add the label map "
            "(or move the case's images to imagesTs/ if it is a test case)"
        )

    # Headers first: geometry of every file of the case, against the first readable channel.
    readable: list[str] = []
    ref: tuple[str, str, Geometry] | None = None  # (description, relative path, geometry)
    for c, rel in channels:
        try:
            geo = read_header(folder / rel)
        except AutosegError as e:
            problems.append(err(e, rel))
            continue
        readable.append(rel)
        if ref is None:
            ref = (f"channel {c}", rel, geo)
        else:
            problems += _geometry_problems(rel, geo, ref, "resample this channel onto the grid of " + ref[0])
    label_ok = False
    if task.label is not None:
        try:
            geo = read_header(folder / task.label)
            label_ok = True
        except AutosegError as e:
            problems.append(err(e, task.label))
        if label_ok and ref is not None:
            desc = "image" if ref[0] == "channel 0" else f"image {ref[0]}"
            problems += _geometry_problems(task.label, geo, (desc,) + ref[1:], "resample the label onto the image grid")

    # Then voxel values, one file in memory at a time.
    for rel in readable:
        try:
            arr, _, counts = read_image_scanned(folder / rel)
        except AutosegError as e:
            problems.append(err(e, rel))
            continue
        n_nan, n_inf = counts if counts is not None else nonfinite_counts(arr)
        if n_nan:
            problems.append(
                f"{rel}: {n_nan} NaN voxel(s) out of {arr.size}; replace them with finite values "
                "(e.g. the image minimum) before training"
            )
        if n_inf:
            problems.append(
                f"{rel}: {n_inf} Inf voxel(s) out of {arr.size}; replace them with finite values "
                "(e.g. clip to the valid intensity range) before training"
            )
        del arr
    if label_ok:
        try:
            arr, _, counts = read_image_scanned(folder / task.label)
        except AutosegError as e:
            problems.append(err(e, task.label))
        else:
            problems += _label_value_problems(task.label, arr, counts, task.declared, warnings)
    return problems, warnings


def _geometry_problems(rel: str, geo: Geometry, ref: tuple[str, str, Geometry], fix: str) -> list[str]:
    desc, ref_rel, ref_geo = ref
    problems = []
    for field, mine, theirs, tol_text in geo.differences(ref_geo):
        if field == "shape":
            return [f"{rel}: shape {mine} differs from {desc} {ref_rel} {theirs} (array order z, y, x); {fix}"]
        problems.append(f"{rel}: {field} {mine} differs from {desc} {ref_rel} {theirs} beyond tolerance {tol_text}; {fix}")
    return problems


def _label_value_problems(
    rel: str, arr: np.ndarray, counts: tuple[int, int] | None, declared: tuple[int, ...], warnings: list[str]
) -> list[str]:
    n_nan, n_inf = counts if counts is not None else nonfinite_counts(arr)
    if n_nan or n_inf:
        return [
            f"{rel}: label map holds {n_nan} NaN and {n_inf} Inf voxel(s); label maps must hold integer class "
            "values; re-export it with an integer type"
        ]
    if not np.issubdtype(arr.dtype, np.integer):
        bad = arr[np.rint(arr) != arr]
        if bad.size:
            return [
                f"{rel}: label map holds {bad.size} non-integer voxel value(s) (e.g. {float(bad.flat[0])!r}); label "
                "maps must hold integer class values; re-export it with an integer type (no interpolation)"
            ]
    values = [int(v) for v in np.unique(arr)]
    undeclared = sorted(set(values) - set(declared))
    if undeclared:
        return [
            f"{rel}: label values {undeclared} are not declared in dataset.json 'labels' (declared: "
            f"{list(declared)}); declare them in 'labels' or fix the label map"
        ]
    if values == [0]:
        warnings.append(
            f"{rel}: label map is all background (only value 0); allowed, but this case adds no foreground examples"
        )
    return []
