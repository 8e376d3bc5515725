"""The Python API: segment one CT from a script or a notebook, as ``autoseg predict`` would, without files between.

>>> import autoseg  # doctest: +SKIP
>>> seg = autoseg.segment("scan.nii.gz", model="model.zip")  # doctest: +SKIP
>>> seg.labels.shape == seg.geometry.shape, seg.volumes_ml()  # doctest: +SKIP

``model`` is a bundle (``autoseg export``) or a trained dataset folder (``$AUTOSEG_RESULTS/Dataset501_X``); load it
once with :func:`load_model` to segment many images. The labels are on the input's grid with the inference plan's
postprocessing applied, exactly what ``autoseg predict`` writes for the same input.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from .bundle import open_bundle
from .errors import AutosegError
from .inference.postprocess import apply_postprocessing
from .inference.predictor import Predictor
from .io.dicom import DicomSeries
from .io.dicom_seg import write_dicom_seg
from .io.images import Geometry, write_image
from .io.inputs import find_inputs, read_input
from .labels import LabelSpec, labels_from_probabilities
from .layout import DICOM_SEG_ENDING
from .pipeline import load_predictors

ImageInput = str | Path | sitk.Image | np.ndarray


@dataclass(frozen=True)
class Segmentation:
    """A label map on the input's grid: ``labels`` (Z, Y, X) uint8 with ``geometry``, the label names, and the
    probabilities (C, Z, Y, X) float32 when asked for."""

    labels: np.ndarray
    geometry: Geometry
    label_names: dict[int, str]
    probabilities: np.ndarray | None = None
    case_id: str = ""
    source: DicomSeries | None = None  # the DICOM series segmented, when it was one (for a DICOM-SEG)
    dataset: Mapping[str, Any] | None = None  # the model's dataset.json (labels, regions)

    def to_sitk(self) -> sitk.Image:
        """The labels as a SimpleITK image with the input's spacing, origin and direction."""
        image = sitk.GetImageFromArray(self.labels)
        image.SetSpacing(self.geometry.spacing)
        image.SetOrigin(self.geometry.origin)
        image.SetDirection(self.geometry.direction)
        return image

    def save(self, path: str | Path) -> None:
        """Write the labels (format from the file name, e.g. ``.nii.gz``; ``.dcm`` is a DICOM-SEG referring to
        the source series, for a segmentation of a DICOM series), atomically."""
        if not str(path).lower().endswith(DICOM_SEG_ENDING):
            write_image(path, self.labels, self.geometry)
        elif self.source is None or self.dataset is None:
            raise AutosegError(f"{path}: a DICOM-SEG refers to the DICOM series it segments, and this segmentation "
                               "is not of a DICOM series; save it as .nii.gz")
        else:
            write_dicom_seg(path, self.labels, self.source, self.dataset, {"model": "autoseg.segment"})

    def volumes_ml(self) -> dict[str, float]:
        """Volume of every named label in mL."""
        voxel_ml = float(np.prod(self.geometry.spacing)) / 1000.0
        counts = np.bincount(self.labels.ravel(), minlength=max(self.label_names, default=0) + 1)
        return {name: float(counts[v] * voxel_ml) for v, name in sorted(self.label_names.items()) if v != 0}


@contextmanager
def _dataset_dir(model: str | Path) -> Iterator[Path]:
    """The trained dataset folder of ``model``: a bundle is imported into a temporary folder (removed after loading,
    the weights are in memory by then), a folder is used as it is."""
    model = Path(model)
    if model.is_file():
        dataset_dir = open_bundle(model)
        try:
            yield dataset_dir
        finally:
            shutil.rmtree(dataset_dir.parent, ignore_errors=True)
    elif model.is_dir():
        yield model
    else:
        raise AutosegError(f"{model}: model not found; pass a bundle (.zip from `autoseg export`) or a trained "
                           "dataset folder such as autoseg_results/Dataset501_Name")


class Model:
    """A loaded model: every configuration and fold the inference plan names, and its postprocessing."""

    def __init__(self, predictors: Sequence[Predictor], postprocessing: dict[str, Any] | None):
        self.predictors, self.postprocessing = list(predictors), postprocessing
        self.meta = self.predictors[0].meta
        self.label_names = LabelSpec.from_meta(self.meta).names

    @classmethod
    def load(cls, model: str | Path, configuration: str | None = None, folds: Sequence[int | str] | None = None,
             device: str = "auto", mirror: bool = True, step: float = 0.5, fast: bool = False,
             precision: str = "auto") -> "Model":
        """Load a bundle or a trained dataset folder (same choices as ``autoseg predict``: ``inference_plan.json``
        when present, else 3d_fullres with every trained fold; ``precision`` as ``--precision``)."""
        with _dataset_dir(model) as dataset_dir:
            predictors, postprocessing = load_predictors(
                dataset_dir, configuration, [str(f) for f in folds] if folds else None, device, mirror, step, fast,
                precision)
        return cls(predictors, postprocessing)

    def segment(self, image: ImageInput, spacing: Sequence[float] | None = None,
                origin: Sequence[float] | None = None, direction: Sequence[float] | None = None,
                probabilities: bool = False, postprocess: bool = True) -> Segmentation:
        """Segment one image; see :func:`segment`."""
        data, geometry, case_id, source = _as_case(image, len(self.meta["channel_names"]),
                                                   self.meta["file_ending"], spacing, origin, direction)
        probs = self.predictors[0].predict_array(data, geometry)
        for p in self.predictors[1:]:
            probs += p.predict_array(data, geometry)
        probs /= len(self.predictors)
        labels = labels_from_probabilities(probs, self.predictors[0].regions_class_order)
        if postprocess and self.postprocessing:
            labels = apply_postprocessing(labels, self.postprocessing)
        return Segmentation(labels, geometry, self.label_names, probs if probabilities else None, case_id, source,
                            self.meta)


def _as_case(image: ImageInput, n_channels: int, ending: str, spacing: Sequence[float] | None,
             origin: Sequence[float] | None,
             direction: Sequence[float] | None) -> tuple[np.ndarray, Geometry, str, DicomSeries | None]:
    """(C, Z, Y, X) float32 data, geometry, a name and the DICOM series it is (or None) for any accepted input."""
    if isinstance(image, (str, Path)):
        cases, problems = find_inputs(Path(image), ending, n_channels)
        if len(cases) != 1:
            found = ", ".join(c.case_id for c in cases) or "none"
            raise AutosegError(f"{image}: holds {len(cases)} cases ({found}){'; ' if problems else ''}"
                               f"{'; '.join(problems)}; segment() takes one image or series, "
                               "`autoseg predict` takes many")
        data, geometry = read_input(cases[0])
        return data, geometry, cases[0].case_id, cases[0] if isinstance(cases[0], DicomSeries) else None
    if isinstance(image, sitk.Image):
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise AutosegError(f"image: a {image.GetDimension()}D image with {image.GetNumberOfComponentsPerPixel()} "
                               "components per voxel; segment() takes a 3D scalar SimpleITK image")
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        return _channels(array, n_channels), Geometry.of(image), "", None
    if isinstance(image, np.ndarray):
        if spacing is None:
            raise AutosegError("image: a numpy array needs spacing=(z, y, x) in mm, in array axis order")
        array = np.asarray(image, dtype=np.float32)
        shape = array.shape[-3:]
        if len(spacing) != 3 or any(not np.isfinite(s) or s <= 0 for s in spacing):
            raise AutosegError(f"spacing: {tuple(spacing)} must be three positive sizes in mm, (z, y, x)")
        geometry = Geometry(tuple(float(s) for s in reversed(spacing)),
                            tuple(float(v) for v in (origin if origin is not None else (0.0, 0.0, 0.0))),
                            tuple(float(v) for v in (direction if direction is not None else np.eye(3).ravel())),
                            tuple(int(n) for n in shape))
        return _channels(array, n_channels), geometry, "", None
    raise AutosegError(f"image: {type(image).__name__} is not a path, a SimpleITK.Image or a numpy array")


def _channels(array: np.ndarray, n_channels: int) -> np.ndarray:
    """(C, Z, Y, X) from a (Z, Y, X) or (C, Z, Y, X) array, checking the channel count and finiteness."""
    data = array[None] if array.ndim == 3 else array
    if data.ndim != 4 or data.shape[0] != n_channels:
        raise AutosegError(f"image: shape {array.shape}; the model needs (Z, Y, X) for one channel or "
                           f"(C, Z, Y, X) with C = {n_channels}")
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise AutosegError(f"image: holds {bad} NaN/Inf voxel(s); replace them with finite values first")
    return data


def load_model(model: str | Path, configuration: str | None = None, folds: Sequence[int | str] | None = None,
               device: str = "auto", mirror: bool = True, step: float = 0.5, fast: bool = False,
               precision: str = "auto") -> Model:
    """Load a model once to segment many images (:meth:`Model.load`)."""
    return Model.load(model, configuration, folds, device, mirror, step, fast, precision)


def segment(image: ImageInput, model: str | Path | Model, spacing: Sequence[float] | None = None,
            origin: Sequence[float] | None = None, direction: Sequence[float] | None = None,
            probabilities: bool = False, postprocess: bool = True, device: str = "auto",
            fast: bool = False) -> Segmentation:
    """Segment one CT and return its labels on the input's grid, postprocessed as the inference plan says.

    ``image``: an image file of any name, a folder with one case (``CASE_0000.nii.gz``) or one DICOM series, a zip
    of one series, a ``SimpleITK.Image``, or a numpy array (Z, Y, X) with ``spacing`` in mm in the same (z, y, x)
    order (``origin``/``direction`` in SimpleITK's x, y, z convention, default 0 and identity). ``model``: a bundle,
    a trained dataset folder, or a :class:`Model` from :func:`load_model`. ``probabilities=True`` also keeps the
    (C, Z, Y, X) probabilities.
    """
    loaded = model if isinstance(model, Model) else Model.load(model, device=device, fast=fast)
    return loaded.segment(image, spacing, origin, direction, probabilities, postprocess)
