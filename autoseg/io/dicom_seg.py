"""DICOM Segmentation out (``predict --output-format dicom-seg``): a label map as a SEG object that refers to the CT
series it was predicted from, so a PACS or viewer shows it over that series.

One binary segment per label of ``dataset.json`` (a region of a region-based dataset, e.g. KiTS23's kidney =
1, 2, 3, is one segment holding all its values), named by the label, in ``dataset.json`` order. Frame ``z`` of the
SEG is slice ``z`` of the label map, which is the series' file ``z`` in GDCM's order (:func:`read_series`), and
refers to that file's SOP Instance UID; positions, orientation and spacing are copied from the source slices, so the
SEG lies on the source grid exactly. Empty frames are left out (a segment that is nowhere has no frames; it is still
listed). Each segment has a coded property (SNOMED CT from pydicom's code dictionary): liver, kidney, spleen and
pancreas as anatomical structures, tumours/lesions as neoplasms (with their organ as the anatomic region when the
organ is a label too), masses and cysts as such, any other name a generic anatomical structure; the algorithm is
identified as autoseg with its version. highdicom (the optional extra ``autoseg[dicom]``) builds and checks the
object.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..atomic import atomic_path
from ..errors import AutosegError
from ..labels import LabelSpec
from ..version import __version__
from .dicom import DicomSeries, local_files

SERIES_NUMBER = 9901  # of the SEG series; distinct from the scanner's usual 1-999
_ORGANS = {"liver": "Liver", "kidney": "Kidney", "kidneys": "Kidney", "spleen": "Spleen", "pancreas": "Pancreas"}
_MASS_RE = re.compile(r"(^|[ _\-])masse?s?$", re.IGNORECASE)
_CYST_RE = re.compile(r"(^|[ _\-])cysts?$", re.IGNORECASE)


def _libraries() -> tuple[Any, Any, Any]:
    """highdicom, pydicom and pydicom's code dictionary, or an error naming the extra to install."""
    try:
        import highdicom
        import pydicom
        from pydicom.sr.codedict import codes
    except ImportError:
        raise AutosegError("--output-format dicom-seg needs highdicom, which is not installed; install the extra: "
                           "pip install 'autoseg[dicom]'") from None
    return highdicom, pydicom, codes


def require_dicom_seg() -> None:
    """Raise now, before any work, when the libraries DICOM-SEG output needs are missing."""
    _libraries()


def segments(meta: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, label values) of every segment, in ``dataset.json`` order: each non-background label, a region with
    all its values."""
    return [(name, values) for name, (_, values) in LabelSpec.from_meta(meta).structures({}).items()]


def _codes(name: str, organ_of_tumour: str | None, codes: Any) -> tuple[Any, Any, list[Any]]:
    """(category, type, anatomic regions) coding a label name."""
    sct = codes.SCT
    organ = _ORGANS.get(name.lower())
    if organ:
        return sct.AnatomicalStructure, getattr(sct, organ), []
    abnormal = sct.MorphologicallyAbnormalStructure
    if organ_of_tumour is not None:
        where = _ORGANS.get(organ_of_tumour.lower())
        return abnormal, sct.Neoplasm, [getattr(sct, where)] if where else []
    if _MASS_RE.search(name):
        return abnormal, sct.Mass, []
    if _CYST_RE.search(name):
        return abnormal, sct.Cyst, []
    return sct.AnatomicalStructure, sct.AnatomicalStructure, []


def _descriptions(meta: Mapping[str, Any], highdicom: Any, codes: Any, parameters: Mapping[str, str]) -> list[Any]:
    spec = LabelSpec.from_meta(meta)
    tumours = {name: organ for name, organ, _ in spec.tumour_organs().values()}
    algorithm = highdicom.AlgorithmIdentificationSequence(
        name="autoseg", family=codes.DCM.ArtificialIntelligence, version=__version__,
        parameters=dict(parameters) or None)
    out = []
    for number, (name, _) in enumerate(segments(meta), start=1):
        category, kind, regions = _codes(name, tumours.get(name), codes)
        out.append(highdicom.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64], segmented_property_category=category,
            segmented_property_type=kind, algorithm_type="AUTOMATIC", algorithm_identification=algorithm,
            anatomic_regions=regions or None))
    return out


def _pixels(labels: np.ndarray, meta: Mapping[str, Any]) -> np.ndarray:
    """What highdicom takes: the label map itself when segment ``k`` is exactly label value ``k`` (labels are
    consecutive 1..N, the usual case, no copy), else one binary mask per segment (Z, Y, X, S)."""
    parts = segments(meta)
    if all(values == (k,) for k, (_, values) in enumerate(parts, start=1)):
        return labels
    return np.stack([np.isin(labels, values) for _, values in parts], axis=-1).astype(np.uint8)


def check_dicom_seg(path: Path) -> None:
    """Raise unless ``path`` reads back as a DICOM Segmentation with its frames (what a rerun may keep)."""
    highdicom, _, _ = _libraries()
    try:
        seg = highdicom.seg.segread(path)
        seg.pixel_array  # decodes every frame: a truncated file fails here
    except Exception as e:  # pydicom and highdicom raise many kinds; any of them means the file is not usable
        raise AutosegError(f"{path}: not a readable DICOM Segmentation ({type(e).__name__}: {e})") from None


def write_dicom_seg(path: str | Path, labels: np.ndarray, series: DicomSeries, meta: Mapping[str, Any],
                    parameters: Mapping[str, str] | None = None) -> None:
    """Write ``labels`` (Z, Y, X) uint8, predicted from ``series`` on its own grid, as a DICOM Segmentation that
    refers to every slice of it, atomically; ``parameters`` go into the algorithm identification (e.g. the
    configuration)."""
    highdicom, pydicom, codes = _libraries()
    with local_files(series) as files:
        sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    if labels.shape != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise AutosegError(f"{series}: the label map is {labels.shape} but the series is {len(sources)} slices of "
                           f"{sources[0].Rows}x{sources[0].Columns}; predict it again")
    if "FrameOfReferenceUID" not in sources[0]:
        raise AutosegError(f"{series}: the slices have no FrameOfReferenceUID (0020,0052), which a DICOM-SEG must "
                           "refer to; export the series with it or use --output-format nifti")
    try:
        seg = highdicom.seg.Segmentation(
            source_images=sources, pixel_array=_pixels(np.asarray(labels), meta), segmentation_type="BINARY",
            segment_descriptions=_descriptions(meta, highdicom, codes, parameters or {}),
            series_instance_uid=highdicom.UID(), series_number=SERIES_NUMBER, sop_instance_uid=highdicom.UID(),
            instance_number=1, manufacturer="autoseg", manufacturer_model_name="autoseg",
            software_versions=__version__, device_serial_number="none",
            series_description="autoseg segmentation"[:64], content_label="AUTOSEG")
    except ValueError as e:  # highdicom's checks of the source headers
        raise AutosegError(f"{series}: cannot be referenced by a DICOM-SEG ({e}); use --output-format nifti") \
            from None
    with atomic_path(path, check_dicom_seg) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
