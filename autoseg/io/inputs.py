"""What ``autoseg predict -i`` and :func:`autoseg.segment` accept, turned into cases to predict.

* a folder of ``CASE_XXXX<ending>`` files (the nnU-Net convention, required for multi-channel models); for a
  single-channel model, any other image file in it (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``) is a case named
  after the file;
* a single image file of any name (single-channel models);
* a folder holding DICOM series, or a zip of one: one case per SeriesInstanceUID, named after the folder or zip
  when it holds one series, else by the UID.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import AutosegError
from .dataset import Case, images_in_folder, read_case
from .dicom import DicomSeries, find_series, find_series_in_zip, read_series
from .images import Geometry

IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha")

InputCase = Case | DicomSeries


def image_stem(path: Path) -> str | None:
    """The file name without its image ending, or None when it is not an image file autoseg reads."""
    name = path.name
    ending = next((e for e in IMAGE_ENDINGS if name.lower().endswith(e)), None)
    return name[: -len(ending)] if ending and len(name) > len(ending) else None


def _single_channel_files(folder: Path, ending: str, taken: set[str]) -> tuple[list[Case], list[str]]:
    """Image files of any name in ``folder`` not following the ``_XXXX`` convention, one case each."""
    channel_file = re.compile(r"^.+_\d{4}$")
    cases, problems = [], []
    for p in sorted(folder.iterdir()):
        stem = image_stem(p)
        if stem is None or p.name.startswith(".") or not p.is_file() or channel_file.match(stem):
            continue
        if stem in taken:
            problems.append(f"{p}: case {stem} is already given by another file; rename or remove one")
            continue
        taken.add(stem)
        cases.append(Case(stem, (p,), None))
    return cases, problems


def find_inputs(path: str | Path, ending: str, n_channels: int) -> tuple[list[InputCase], list[str]]:
    """The cases ``path`` holds and a problem line per file or series left out; raises when nothing usable is
    there, saying what ``-i`` accepts."""
    path = Path(path)
    accepted = (f"-i takes a folder of CASE_0000{ending} images, a single image file, or a DICOM series folder or "
                "zip")
    if not path.exists():
        raise AutosegError(f"{path}: not found; {accepted}")
    if path.is_file():
        if path.name.lower().endswith(".zip"):
            series = find_series_in_zip(path)
            if not series:
                raise AutosegError(f"{path}: holds no DICOM series; {accepted}")
            return _channels_ok(path, series, n_channels), []
        stem = image_stem(path)
        if stem is None:
            raise AutosegError(f"{path}: not an image file ({', '.join(IMAGE_ENDINGS)}); {accepted}")
        if n_channels != 1:
            raise AutosegError(f"{path}: the model needs {n_channels} channels per case; pass the folder holding "
                               f"CASE_0000{ending}..CASE_{n_channels - 1:04d}{ending}")
        return [Case(re.sub(r"_0000$", "", stem), (path,), None)], []
    cases, problems = images_in_folder(path, ending, n_channels)
    inputs: list[InputCase] = list(cases)
    if n_channels == 1:
        # files of any name join the convention's cases; they are no longer "not CASE_XXXX" problems
        extra, clashes = _single_channel_files(path, ending, {c.case_id for c in cases})
        named = {str(c.images[0]) for c in extra}
        problems = [p for p in problems if p.split(": ")[0] not in named] + clashes
        inputs += extra
    if not inputs:
        series = find_series(path)
        if series:
            return _channels_ok(path, series, n_channels), []
    if not inputs and not problems:
        raise AutosegError(f"{path}: holds no images and no DICOM series; {accepted}")
    return inputs, problems


def _channels_ok(path: Path, series: list[DicomSeries], n_channels: int) -> list[InputCase]:
    if n_channels != 1:
        raise AutosegError(f"{path}: a DICOM series is one channel but the model needs {n_channels}; convert the "
                           "series to CASE_0000.nii.gz, ... files")
    return list(series)


def read_input(case: InputCase) -> tuple[np.ndarray, Geometry]:
    """All channels of one case as float32 (C, Z, Y, X) and its geometry."""
    if isinstance(case, DicomSeries):
        array, geometry = read_series(case)
        return array.astype(np.float32, copy=False)[None], geometry
    data, _, geometry = read_case(case)
    return data, geometry
