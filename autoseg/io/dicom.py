"""DICOM series in: a folder (or a zip) holding one or several CT series, read with SimpleITK's GDCM series reader.

GDCM groups files by SeriesInstanceUID and sorts each series along the slice normal; the reader applies the
rescale slope and intercept, so voxels are Hounsfield units. Before a series is read it is checked slice by slice,
because ITK reads a broken series without complaint: a missing slice leaves a gap that ITK silently closes (every
structure below it shifts), and slices whose positions disagree with their instance numbers are a shuffled or mixed
export. Both are refused, naming the series and the slices.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import AutosegError
from .images import Geometry, to_sitk

GAP_RTOL = 0.1  # a gap may differ from the median by 10 % (scanners round positions; a missing slice is 100 %)
ORIENTATION_ATOL = 1e-4
ZIP_MAX_BYTES = 16 * 2**30  # uncompressed; a CT series is well below a few GB
ZIP_MAX_MEMBERS = 100_000

_POSITION, _ORIENTATION, _INSTANCE, _SERIES_UID = "0020|0032", "0020|0037", "0020|0013", "0020|000e"


@dataclass(frozen=True)
class DicomSeries:
    """One series to predict: output name, SeriesInstanceUID, its files in GDCM's slice order, and the zip the files
    are members of (paths inside it) when it came zipped."""

    case_id: str
    uid: str
    files: tuple[str, ...]
    zip_path: Path | None = None

    @property
    def images(self) -> tuple[Path, ...]:
        """The files on disk the series comes from (the zip when zipped): what an output must be newer than."""
        return (self.zip_path,) if self.zip_path else tuple(Path(f) for f in self.files)

    def __str__(self) -> str:
        where = f"{self.zip_path}:" if self.zip_path else ""
        return f"DICOM series {self.uid} ({where}{Path(self.files[0]).parent}, {len(self.files)} files)"


def _series_in(folder: Path) -> dict[str, list[str]]:
    """SeriesInstanceUID -> files in GDCM's order, for the DICOM files directly in ``folder``."""
    reader = sitk.ImageSeriesReader
    return {uid: list(reader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in reader.GetGDCMSeriesIDs(str(folder))}


def _name_series(uids: Sequence[str], single_name: str) -> dict[str, str]:
    """One series is named after its folder or zip; several are named by their SeriesInstanceUID."""
    return {uids[0]: single_name} if len(uids) == 1 else {u: u for u in uids}


def find_series(folder: str | Path) -> list[DicomSeries]:
    """Every DICOM series directly in ``folder`` (empty when there is none)."""
    folder = Path(folder)
    found = _series_in(folder)
    names = _name_series(sorted(found), folder.name)
    return [DicomSeries(names[u], u, tuple(found[u])) for u in sorted(found)]


def _check_member(zip_path: Path, info: zipfile.ZipInfo) -> None:
    p = PurePosixPath(info.filename)
    is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
    if p.is_absolute() or ".." in p.parts or "\\" in info.filename or is_link:
        raise AutosegError(f"{zip_path}: member {info.filename!r} is a link or points outside the archive; "
                           "zip the series folder itself")


@contextmanager
def _extracted(zip_path: Path, members: Sequence[str] | None = None) -> Iterator[Path]:
    """``zip_path`` (or only ``members`` of it) extracted into a temporary folder, removed afterwards."""
    try:
        zf = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as e:
        raise AutosegError(f"{zip_path}: not a readable zip file ({e}); zip the DICOM series folder again") from None
    tmp = Path(tempfile.mkdtemp(prefix="autoseg-dicom-"))
    try:
        with zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
            if len(infos) > ZIP_MAX_MEMBERS or sum(i.file_size for i in infos) > ZIP_MAX_BYTES:
                raise AutosegError(f"{zip_path}: more than {ZIP_MAX_MEMBERS} files or {ZIP_MAX_BYTES >> 30} GB "
                                   "uncompressed; is it one CT series? unzip it and pass the folder")
            wanted = None if members is None else set(members)
            for info in infos:
                _check_member(zip_path, info)
                if wanted is None or info.filename in wanted:
                    zf.extract(info, tmp)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def find_series_in_zip(zip_path: str | Path) -> list[DicomSeries]:
    """Every DICOM series in a zip, in any of its folders; the files are named by their path inside the zip."""
    zip_path = Path(zip_path)
    out: dict[str, tuple[str, ...]] = {}
    with _extracted(zip_path) as tmp:
        for folder in sorted({p.parent for p in tmp.rglob("*") if p.is_file()}):
            for uid, files in _series_in(folder).items():
                if uid in out:
                    raise AutosegError(f"{zip_path}: series {uid} is split over several folders; keep one series "
                                       "in one folder")
                out[uid] = tuple(Path(f).relative_to(tmp).as_posix() for f in files)
    names = _name_series(sorted(out), zip_path.name[: -len(".zip")])
    return [DicomSeries(names[u], u, out[u], zip_path) for u in sorted(out)]


def _slice_header(path: str) -> dict[str, str]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise AutosegError(f"{path}: cannot be read as DICOM ({str(e).strip().splitlines()[-1]}); "
                           "is the file complete?") from None
    return {k: reader.GetMetaData(k).strip() for k in (_POSITION, _ORIENTATION, _INSTANCE) if reader.HasMetaDataKey(k)}


def _floats(text: str) -> np.ndarray:
    return np.array([float(v) for v in text.split("\\")], dtype=np.float64)


def series_problem(series: DicomSeries, files: Sequence[str]) -> str | None:
    """Why the slices of a series (``files`` in GDCM's order, readable on disk) do not make one evenly spaced
    volume, or None. Pure on the headers: missing position/orientation, mixed orientations, duplicate positions, a
    gap (missing slices) and instance numbers out of step with the positions (a shuffled export)."""
    if len(files) < 2:
        return f"{series}: has {len(files)} slice; a CT volume needs several, is the series complete?"
    heads = [_slice_header(f) for f in files]
    lacking = [Path(f).name for f, h in zip(files, heads) if _POSITION not in h or _ORIENTATION not in h]
    if lacking:
        return (f"{series}: slice(s) {lacking[:5]} have no ImagePositionPatient/ImageOrientationPatient; "
                "autoseg reads volumetric CT series only")
    orient = np.array([_floats(h[_ORIENTATION]) for h in heads])
    if np.abs(orient - orient[0]).max() > ORIENTATION_ATOL:
        return f"{series}: slices have different ImageOrientationPatient; it mixes acquisitions, export one of them"
    normal = np.cross(orient[0][:3], orient[0][3:])
    depth = np.array([_floats(h[_POSITION]) @ normal for h in heads])
    gaps = np.diff(depth)
    median = float(np.median(np.abs(gaps)))
    if median <= 0 or np.any(np.abs(gaps) < GAP_RTOL * median):
        return f"{series}: two or more slices share one position; it mixes acquisitions, export one of them"
    bad = np.flatnonzero(np.abs(np.abs(gaps) - median) > GAP_RTOL * median)
    if bad.size:
        i = int(bad[0])
        return (f"{series}: the slice gap between {Path(files[i]).name} and {Path(files[i + 1]).name} is "
                f"{abs(gaps[i]):.3g} mm where the others are {median:.3g} mm; slices are missing, export the "
                "complete series")
    if all(_INSTANCE in h for h in heads):
        numbers = np.array([float(h[_INSTANCE]) for h in heads])
        steps = np.sign(np.diff(numbers))
        if not (np.all(steps > 0) or np.all(steps < 0)):
            i = int(np.flatnonzero(steps != steps[0])[0])
            return (f"{series}: slices are out of order, {Path(files[i]).name} (InstanceNumber {numbers[i]:g}) lies "
                    f"next to {Path(files[i + 1]).name} (InstanceNumber {numbers[i + 1]:g}) along the slice normal, "
                    "against the order of the others; the series was shuffled or mixes exports, export it again")
    return None


def _read_files(series: DicomSeries, files: Sequence[str]) -> tuple[np.ndarray, Geometry]:
    problem = series_problem(series, files)
    if problem:
        raise AutosegError(problem)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise AutosegError(f"{series}: cannot be read ({str(e).strip().splitlines()[-1]})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise AutosegError(f"{series}: is not a greyscale CT series ({image.GetNumberOfComponentsPerPixel()} "
                           "components per pixel)")
    return sitk.GetArrayFromImage(image), Geometry.of(image)


@contextmanager
def local_files(series: DicomSeries) -> Iterator[list[str]]:
    """The series' files on disk in GDCM's slice order: its own files, or for a zipped series its members extracted
    to a temporary folder that lasts while the block runs."""
    if series.zip_path is None:
        yield list(series.files)
        return
    with _extracted(series.zip_path, series.files) as tmp:
        yield [str(tmp / f) for f in series.files]


def read_series(series: DicomSeries) -> tuple[np.ndarray, Geometry]:
    """A checked series as a (Z, Y, X) array in HU and its exact geometry: slice ``z`` of the array is
    ``series.files[z]``."""
    with local_files(series) as files:
        return _read_files(series, files)


def write_series(folder: str | Path, image: np.ndarray, geometry: Geometry, series_uid: str,
                 study_uid: str = "1.2.826.0.1.3680043.8.498.1") -> list[Path]:
    """Write a (Z, Y, X) HU volume as a CT series of int16 slices ``IM00001.dcm``... (tests, benchmarks and turning a
    phantom into DICOM). The direction must be right-handed: a DICOM series stores only the in-plane axes and
    orders slices along their normal."""
    d = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    if np.linalg.det(d) < 0:
        raise AutosegError(f"direction {geometry.direction} is left-handed; DICOM slices follow the in-plane normal, "
                           "flip the array along z and move the origin first")
    volume = to_sitk(np.asarray(image).astype(np.int16), geometry)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    orientation = "\\".join(f"{v:.10g}" for v in (*d[:, 0], *d[:, 1]))
    common = {"0008|0060": "CT", "0020|000d": study_uid, "0020|000e": series_uid, "0020|0037": orientation,
              "0020|0052": f"{series_uid}.0",  # FrameOfReferenceUID (a DICOM-SEG refers to it); slices are .1, ...
              "0010|0010": "PHANTOM^AUTOSEG", "0010|0020": "autoseg", "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
              "0018|0050": f"{geometry.spacing[2]:.10g}", "0028|1052": "0", "0028|1053": "1", "0028|1054": "HU"}
    written = []
    for z in range(volume.GetDepth()):
        slice_ = volume[:, :, z]
        for k, v in common.items():
            slice_.SetMetaData(k, v)
        position = volume.TransformIndexToPhysicalPoint((0, 0, z))
        slice_.SetMetaData("0020|0032", "\\".join(f"{v:.10g}" for v in position))
        slice_.SetMetaData("0020|0013", str(z + 1))
        slice_.SetMetaData("0008|0018", f"{series_uid}.{z + 1}")
        path = folder / f"IM{z + 1:05d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(slice_)
        written.append(path)
    return written
