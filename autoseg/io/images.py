"""Read and write single images through SimpleITK, keeping geometry exact.

Arrays are (Z, Y, X) per channel, as ``SimpleITK.GetArrayFromImage`` gives them. SimpleITK's own (x, y, z)
spacing, origin and direction are carried verbatim in :class:`Geometry`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..atomic import atomic_path, write_npz
from ..errors import AutosegError
from ..memory import require_memory
from .nifti import nifti_scan, nonfinite_counts

SPACING_ORIGIN_RTOL = 1e-4  # relative to max(|a|, |b|, 1); messages spell it "1e-4"
DIRECTION_ATOL = 1e-3  # absolute, per matrix element; messages spell it "1e-3"


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

    def differences(self, other: "Geometry") -> list[tuple[str, tuple, tuple, str]]:
        """How this geometry differs from ``other``: ``(field, mine, theirs, tolerance)`` per differing field.

        A different shape is reported alone (nothing else is comparable then). Spacing and origin may differ by
        ``SPACING_ORIGIN_RTOL`` relative to ``max(|a|, |b|, 1)``, direction by ``DIRECTION_ATOL`` per element.
        """
        if tuple(self.shape) != tuple(other.shape):
            return [("shape", tuple(self.shape), tuple(other.shape), "")]
        out = []
        for field, tol, tol_text, relative in (("spacing", SPACING_ORIGIN_RTOL, "1e-4", True),
                                               ("origin", SPACING_ORIGIN_RTOL, "1e-4", True),
                                               ("direction", DIRECTION_ATOL, "1e-3", False)):
            a, b = getattr(self, field), getattr(other, field)
            if len(a) != len(b) or any(abs(x - y) > tol * (max(abs(x), abs(y), 1.0) if relative else 1.0)
                                       for x, y in zip(a, b)):
                out.append((field, tuple(v + 0.0 for v in a), tuple(v + 0.0 for v in b), tol_text))  # -0.0 shown as 0.0
        return out

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(
            spacing=tuple(float(v) for v in image.GetSpacing()),
            origin=tuple(float(v) for v in image.GetOrigin()),
            direction=tuple(float(v) for v in image.GetDirection()),
            shape=tuple(int(v) for v in reversed(image.GetSize())),
        )



def read_image(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read one 3D volume as a (Z, Y, X) array and its geometry; 2D, 4D, vector and unreadable files are errors.

    NIfTI files are also checked for truncation (ITK silently zero-fills a cut-off ``.nii``/``.nii.gz``). NaN or
    Inf voxels are an error too: ITK (SimpleITK <= 2.5) reads them from NIfTI as 0, so without this check a scan
    with missing values would be trained on silently.
    """
    array, geometry, counts = read_image_scanned(path)
    n_nan, n_inf = counts if counts is not None else nonfinite_counts(array)
    if n_nan or n_inf:
        raise AutosegError(
            f"{path}: holds {n_nan} NaN and {n_inf} Inf voxel(s) out of {array.size}; replace them with finite "
            "values (e.g. the image minimum) and rerun"
        )
    return array, geometry


def read_image_scanned(path: str | Path) -> tuple[np.ndarray, Geometry, tuple[int, int] | None]:
    """:func:`read_image` plus the (NaN, Inf) voxel counts of the file on disk (None when not a NIfTI file: then
    the array itself holds them)."""
    path = Path(path)
    geometry = read_header(path)  # checks the header before any voxel is allocated
    require_memory(int(np.prod(geometry.shape, dtype=np.float64)) * 8, f"{path}: reading {geometry.shape} voxels",
                   "check the image size in its header")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise AutosegError(_unreadable(path, e)) from None
    _check_layout(path, image.GetDimension(), image.GetSize(), image.GetNumberOfComponentsPerPixel())
    counts = None
    if path.name.lower().endswith((".nii", ".nii.gz")):
        reason, counts = nifti_scan(path)
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
    geometry = Geometry(
        spacing=tuple(float(v) for v in reader.GetSpacing()),
        origin=tuple(float(v) for v in reader.GetOrigin()),
        direction=tuple(float(v) for v in reader.GetDirection()),
        shape=tuple(int(v) for v in reversed(size)),
    )
    if not all(math.isfinite(v) and v > 0 for v in geometry.spacing):
        raise AutosegError(f"{path}: header spacing {geometry.spacing} mm is not finite and positive; fix the pixel "
                           "spacing in the header (e.g. with SimpleITK SetSpacing) and rerun")
    if not all(math.isfinite(v) for v in geometry.origin + geometry.direction):
        raise AutosegError(f"{path}: header origin {geometry.origin} or direction holds NaN/Inf; fix the header")
    return geometry


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
    def check(tmp: Path) -> None:  # read it back: a full disk can leave a short file and no error
        back, geo, _ = read_image_scanned(tmp)
        if geo.shape != tuple(geometry.shape) or not np.array_equal(back, array):
            raise ValueError(f"reads back as {back.dtype} {geo.shape}, not the {array.dtype} {array.shape} written")

    with atomic_path(path, check) as tmp:
        sitk.WriteImage(to_sitk(array, geometry), str(tmp), compress)


def write_probabilities(path: str | Path, probs: np.ndarray, geometry: Geometry) -> None:
    """Save (C, Z, Y, X) probabilities as float16 with their geometry in one ``.npz`` (atomic, no pickle)."""
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
