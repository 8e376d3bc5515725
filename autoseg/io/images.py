"""Read and write datasets in the nnU-Net v2 raw layout through SimpleITK, keeping geometry exact.

Arrays are (Z, Y, X) per channel, stacked to (C, Z, Y, X), as ``SimpleITK.GetArrayFromImage`` gives them.
SimpleITK's own (x, y, z) spacing, origin and direction are carried verbatim in :class:`Geometry`.
"""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import SimpleITK as sitk

from ..atomic import TMP_MARK, atomic_path
from ..errors import AutosegError, DatasetError

REQUIRED_KEYS = {"channel_names": dict, "labels": dict, "numTraining": int, "file_ending": str}
_KEY_EXAMPLES = {"channel_names": '{"0": "CT"}', "labels": '{"background": 0, "liver": 1}', "numTraining": "24",
                 "file_ending": '".nii.gz"'}  # shown in the fix of a missing or mistyped key


@dataclass(frozen=True)
class Geometry:
    """Physical placement of a volume, in SimpleITK's (x, y, z) order, plus the array shape in (z, y, x)."""

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    shape: tuple[int, ...]

    @property
    def spacing_zyx(self) -> tuple[float, ...]:
        return tuple(reversed(self.spacing))

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Geometry":
        return cls(*(tuple(d[k]) for k in ("spacing", "origin", "direction", "shape")))

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(
            spacing=tuple(float(v) for v in image.GetSpacing()),
            origin=tuple(float(v) for v in image.GetOrigin()),
            direction=tuple(float(v) for v in image.GetDirection()),
            shape=tuple(int(v) for v in reversed(image.GetSize())),
        )


@dataclass(frozen=True)
class Case:
    """One case: its id, one image file per channel (in channel order) and the label file if any."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None


def load_dataset_json(folder: str | Path) -> dict[str, Any]:
    """Read and check ``dataset.json``; every problem is reported at once, naming the key and the fix."""
    path = Path(folder) / "dataset.json"
    if not path.is_file():
        raise DatasetError([f"{path}: file not found; every dataset needs a dataset.json (nnU-Net v2 layout)"])
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError([f"{path}: not valid JSON ({e}); fix the syntax"]) from None
    if not isinstance(meta, dict):
        raise DatasetError([f"{path}: top level must be an object, found {type(meta).__name__}"])
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
        problems += _check_labels(path, meta["labels"])
        if not meta["channel_names"]:
            problems.append(f"{path}: 'channel_names' is empty; declare at least one channel, e.g. {{\"0\": \"CT\"}}")
        elif sorted(meta["channel_names"]) != [str(i) for i in range(len(meta["channel_names"]))]:
            problems.append(
                f"{path}: 'channel_names' keys must be '0'..'{len(meta['channel_names']) - 1}', "
                f"found {sorted(meta['channel_names'])}"
            )
        if not meta["file_ending"].startswith("."):
            problems.append(f"{path}: 'file_ending' must start with '.', found {meta['file_ending']!r}")
    if problems:
        raise DatasetError(problems)
    return meta


def _check_labels(path: Path, labels: dict[str, Any]) -> list[str]:
    problems = []
    if labels.get("background") != 0:
        problems.append(f"{path}: 'labels' must map 'background' to 0, found {labels.get('background')!r}")
    for name, value in labels.items():
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 256 for v in values):
            problems.append(f"{path}: label '{name}' must be an integer 0-255 or a list of them, found {value!r}")
    return problems


def label_values(meta: dict[str, Any]) -> list[int]:
    """All integer label values a label map may contain (regions contribute their member values)."""
    values: set[int] = set()
    for v in meta["labels"].values():
        values.update(v if isinstance(v, list) else [v])
    return sorted(values)


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


def read_image(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read one 3D volume as a (Z, Y, X) array and its geometry; 2D, 4D, vector and unreadable files are errors.

    NIfTI files are also checked for truncation (ITK silently zero-fills a cut-off ``.nii``/``.nii.gz``). NaN or
    Inf voxels are an error too: ITK (SimpleITK <= 2.5) reads them from NIfTI as 0, so without this check a scan
    with missing values would be trained on silently.
    """
    array, geometry, counts = _read_image_scanned(path)
    n_nan, n_inf = counts if counts is not None else _nonfinite(array)
    if n_nan or n_inf:
        raise AutosegError(
            f"{path}: holds {n_nan} NaN and {n_inf} Inf voxel(s) out of {array.size}; replace them with finite "
            "values (e.g. the image minimum) and rerun"
        )
    return array, geometry


def _read_image_scanned(path: str | Path) -> tuple[np.ndarray, Geometry, tuple[int, int] | None]:
    """:func:`read_image` plus the (NaN, Inf) voxel counts of the file on disk (None when not a NIfTI file: then
    the array itself holds them)."""
    path = Path(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise AutosegError(_unreadable(path, e)) from None
    _check_layout(path, image.GetDimension(), image.GetSize(), image.GetNumberOfComponentsPerPixel())
    counts = None
    if path.name.lower().endswith((".nii", ".nii.gz")):
        reason, counts = _nifti_scan(path)
        if reason:
            raise AutosegError(
                f"{path}: file is truncated or corrupt ({reason}); re-export or copy it again from the source"
            )
    return sitk.GetArrayFromImage(image), Geometry.of(image), counts


def read_header(path: str | Path) -> Geometry:
    """Geometry of one 3D volume from its header only (no voxel data read); same errors as :func:`read_image`."""
    path = Path(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise AutosegError(_unreadable(path, e)) from None
    size = reader.GetSize()
    _check_layout(path, reader.GetDimension(), size, reader.GetNumberOfComponents())
    return Geometry(
        spacing=tuple(float(v) for v in reader.GetSpacing()),
        origin=tuple(float(v) for v in reader.GetOrigin()),
        direction=tuple(float(v) for v in reader.GetDirection()),
        shape=tuple(int(v) for v in reversed(size)),
    )


def _unreadable(path: Path, e: Exception) -> str:
    reason = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown reader error"
    return f"{path}: cannot be read as an image ({reason}); is the file complete and a NIfTI/NRRD/MHA?"


def _check_layout(path: Path, dimension: int, size: tuple[int, ...], components: int) -> None:
    if dimension != 3:
        raise AutosegError(
            f"{path}: image is {dimension}D (size {tuple(size)}); autoseg needs 3D volumes, "
            "one file per channel (split 4D files into _0000, _0001, ...)"
        )
    if components != 1:
        raise AutosegError(f"{path}: has {components} components per voxel; store one channel per file")


_NIFTI_HEAD = 544  # NIfTI-2 header size; NIfTI-1 uses the first 348 bytes
_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype codes of real floating-point voxels


class _Broken(Exception):
    """A compressed stream that cannot be decompressed to its end."""


def _file_bytes(path: Path) -> Iterator[bytes]:
    """The (decompressed, for ``.gz``) bytes of a file in bounded chunks; raises :class:`_Broken` on a cut-off or
    corrupt gzip stream (several gzip members are fine; padding after the last one is ignored)."""
    with open(path, "rb") as fh:
        if not path.name.lower().endswith(".gz"):
            while chunk := fh.read(1 << 22):
                yield chunk
            return
        d, pending = zlib.decompressobj(16 + zlib.MAX_WBITS), b""
        while True:
            if not pending:
                pending = fh.read(1 << 20)
                if not pending:
                    break
            try:
                out = d.decompress(pending, 1 << 22)
            except zlib.error as e:
                raise _Broken(f"compressed data is corrupt: {e}") from None
            pending = d.unconsumed_tail
            if out:
                yield out
            if d.eof:
                rest = d.unused_data + pending
                if len(rest) < 2:
                    rest += fh.read(1 << 20)
                if not rest.startswith(b"\x1f\x8b"):
                    return
                d, pending = zlib.decompressobj(16 + zlib.MAX_WBITS), rest
        if not d.eof:
            raise _Broken("gzip stream ends early")


def _nifti_scan(path: Path) -> tuple[str | None, tuple[int, int]]:
    """One streaming pass over a ``.nii``/``.nii.gz``: why it is truncated or corrupt (None if it is not), and its
    (NaN, Inf) voxel counts for float data. Memory stays bounded (a few MiB), whatever the file size."""
    total, nan, inf = 0, 0, 0
    head = bytearray()
    layout = None  # (voxel start, voxel end, numpy dtype or None), once the header is in
    carry = b""

    def count(data: bytes, start: int) -> None:
        nonlocal nan, inf, carry
        lo, hi, dtype = layout
        data = data[max(lo - start, 0) : max(hi - start, 0)]
        if dtype is None or not data:
            return
        data = carry + data
        usable = len(data) - len(data) % dtype.itemsize
        values, carry = np.frombuffer(data[:usable], dtype), data[usable:]
        nan += int(np.count_nonzero(np.isnan(values)))
        inf += int(np.count_nonzero(np.isinf(values)))

    try:
        for chunk in _file_bytes(path):
            if layout is None:
                head += chunk
                if len(head) >= _NIFTI_HEAD:
                    layout = _nifti_layout(bytes(head[:_NIFTI_HEAD]))
                    if layout is None:
                        return None, (0, 0)
                    if layout[2] is None and not path.name.lower().endswith(".gz"):
                        total = path.stat().st_size  # uncompressed, no floats to count: the size says it all
                        break
                    count(bytes(head), 0)
                    head = bytearray(head[:_NIFTI_HEAD])
            else:
                count(chunk, total)
            total += len(chunk)
    except _Broken as e:
        return f"{e}, after {total} decompressed bytes", (nan, inf)
    if layout is None:  # a file shorter than 544 bytes (tiny NIfTI-1 image)
        layout = _nifti_layout(bytes(head))
        if layout is None:
            return None, (0, 0)
        count(bytes(head), 0)
    if total < layout[1]:
        return f"holds {total} bytes, header promises {layout[1]}", (nan, inf)
    return None, (nan, inf)


def _nifti_layout(head: bytes) -> tuple[int, int, np.dtype | None] | None:
    """(voxel start, voxel end, float dtype or None) of a single-file NIfTI-1/2 header; None if not one."""
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            datatype, bitpix = struct.unpack(endian + "2h", head[70:74])
            dims = struct.unpack(endian + "8h", head[40:56])
            offset = max(int(struct.unpack(endian + "f", head[108:112])[0]), 352)
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            datatype, bitpix = struct.unpack(endian + "2h", head[12:16])
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = max(int(struct.unpack(endian + "q", head[168:176])[0]), 544)
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0 or any(n < 0 for n in dims[1 : dims[0] + 1]):
        return None
    end = offset + (math.prod(dims[1 : dims[0] + 1]) * bitpix + 7) // 8
    dtype = np.dtype(endian + _NIFTI_FLOATS[datatype]) if datatype in _NIFTI_FLOATS else None
    return offset, end, dtype


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


def to_sitk(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """Wrap a (Z, Y, X) array in a SimpleITK image with ``geometry`` restored verbatim."""
    if tuple(array.shape) != tuple(geometry.shape):
        raise ValueError(f"array shape {array.shape} does not match geometry shape {geometry.shape}")
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def write_image(path: str | Path, array: np.ndarray, geometry: Geometry, compress: bool = True) -> None:
    """Write a (Z, Y, X) array with ``geometry`` atomically; the format follows the file name.

    Two-file formats (``.mhd``/``.hdr``/``.nhdr``) are refused: their header names the data file, and the atomic
    temporary name would be baked into it.
    """
    if Path(path).suffix.lower() in (".mhd", ".hdr", ".img", ".nhdr"):
        raise AutosegError(f"{path}: two-file image formats cannot be written atomically; use .nii.gz, .nrrd or .mha")
    with atomic_path(path) as tmp:
        sitk.WriteImage(to_sitk(array, geometry), str(tmp), compress)


# ----------------------------------------------------------------------------------------------------------------
# Dataset verification: every problem in a raw dataset, collected in one pass.

SPACING_ORIGIN_RTOL = 1e-4  # relative to max(|a|, |b|, 1); messages spell it "1e-4"
DIRECTION_ATOL = 1e-3  # absolute, per matrix element; messages spell it "1e-3"


def check_dataset(
    folder: str | Path, warnings: list[str] | None = None, num_workers: int = 1
) -> dict[str, Any]:
    """Load ``dataset.json`` and verify the whole dataset; raise :class:`DatasetError` with every problem, else
    return the metadata. Warnings (allowed oddities) are appended to ``warnings`` when given."""
    meta = load_dataset_json(folder)
    problems = verify_dataset(folder, meta, warnings=warnings, num_workers=num_workers)
    if problems:
        raise DatasetError(problems)
    return meta


def verify_dataset(
    folder: str | Path,
    meta: dict[str, Any] | None = None,
    warnings: list[str] | None = None,
    num_workers: int = 1,
) -> list[str]:
    """All problems of the raw training set in ``folder`` (nnU-Net v2 layout); an empty list means it is usable.

    ``meta`` is ``dataset.json`` as returned by :func:`load_dataset_json` (read from ``folder`` when None; if that
    fails its problems are returned). Allowed oddities (an all-background label map) go to ``warnings`` when a list
    is given. Cases are checked one at a time (headers first, then voxels), in ``num_workers`` processes when > 1;
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

    declared, label_expected = tuple(label_values(meta)), label_dir.is_dir()
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
    if num_workers > 1 and len(tasks) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        with ProcessPoolExecutor(
            max_workers=min(num_workers, len(tasks)),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
        ) as pool:
            try:
                results = list(pool.map(_verify_case, tasks))
            except BrokenProcessPool:  # the OOM killer or a crash in a reader, not a Python exception
                raise AutosegError(f"{folder}: a --verify worker process died abruptly (most likely out of memory); "
                                   "rerun with -np 1") from None
    else:
        results = [_verify_case(t) for t in tasks]
    for case_problems, case_warnings in results:
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
            arr, _, counts = _read_image_scanned(folder / rel)
        except AutosegError as e:
            problems.append(err(e, rel))
            continue
        n_nan, n_inf = counts if counts is not None else _nonfinite(arr)
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
            arr, _, counts = _read_image_scanned(folder / task.label)
        except AutosegError as e:
            problems.append(err(e, task.label))
        else:
            problems += _label_value_problems(task.label, arr, counts, task.declared, warnings)
    return problems, warnings


def _show(values: tuple[float, ...]) -> tuple[float, ...]:
    """Values for a message: -0.0 (common in NIfTI directions) shown as 0.0."""
    return tuple(v + 0.0 for v in values)


def _nonfinite(arr: np.ndarray) -> tuple[int, int]:
    if not np.issubdtype(arr.dtype, np.inexact):
        return 0, 0
    return int(np.count_nonzero(np.isnan(arr))), int(np.count_nonzero(np.isinf(arr)))


def _geometry_problems(rel: str, geo: Geometry, ref: tuple[str, str, Geometry], fix: str) -> list[str]:
    desc, ref_rel, ref_geo = ref
    if geo.shape != ref_geo.shape:
        return [
            f"{rel}: shape {geo.shape} differs from {desc} {ref_rel} {ref_geo.shape} (array order z, y, x); {fix}"
        ]
    problems = []
    for field, tol, tol_text, relative in (
        ("spacing", SPACING_ORIGIN_RTOL, "1e-4", True),
        ("origin", SPACING_ORIGIN_RTOL, "1e-4", True),
        ("direction", DIRECTION_ATOL, "1e-3", False),
    ):
        a, b = getattr(geo, field), getattr(ref_geo, field)
        if len(a) != len(b) or any(
            abs(x - y) > tol * (max(abs(x), abs(y), 1.0) if relative else 1.0) for x, y in zip(a, b)
        ):
            problems.append(
                f"{rel}: {field} {_show(a)} differs from {desc} {ref_rel} {_show(b)} beyond tolerance {tol_text}; {fix}"
            )
    return problems


def _label_value_problems(
    rel: str, arr: np.ndarray, counts: tuple[int, int] | None, declared: tuple[int, ...], warnings: list[str]
) -> list[str]:
    n_nan, n_inf = counts if counts is not None else _nonfinite(arr)
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


def write_probabilities(path: str | Path, probs: np.ndarray, geometry: Geometry) -> None:
    """Save (C, Z, Y, X) probabilities as float16 with their geometry in one ``.npz`` (atomic, no pickle)."""
    from ..atomic import write_npz

    write_npz(path, {"probabilities": probs.astype(np.float16), "spacing": np.array(geometry.spacing),
                     "origin": np.array(geometry.origin), "direction": np.array(geometry.direction)})


def read_probabilities(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Probabilities (C, Z, Y, X) float32 and geometry from :func:`write_probabilities`' file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            probs = z["probabilities"].astype(np.float32)
            geo = Geometry(tuple(z["spacing"].tolist()), tuple(z["origin"].tolist()),
                           tuple(z["direction"].tolist()), tuple(probs.shape[1:]))
    except (OSError, KeyError, ValueError) as e:
        raise AutosegError(f"{path}: not a probabilities file written by autoseg ({e})") from None
    return probs, geo
