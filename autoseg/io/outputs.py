"""What ``autoseg predict`` writes for one case, and whether a rerun may keep it.

Formats: ``nifti`` (the default; the label map in the dataset's file ending, e.g. ``CASE.nii.gz``) and
``dicom-seg`` (``CASE.dcm``, a DICOM Segmentation referring to the source series; DICOM input only). Each case's
outputs are followed by a record ``CASE.model.json`` naming the model that made them (:func:`record_model`): a rerun
keeps an output only when it is complete, newer than its inputs and recorded as made by the same model, so a
retrained model, another configuration or changed postprocessing predicts the cases again without ``--overwrite``.
The record is written after the outputs: a run killed in between leaves a case without its record, which the
rerun predicts again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..atomic import write_json
from ..errors import AutosegError
from ..jsonfile import read_json
from ..layout import DICOM_SEG_ENDING, model_record
from .dicom import DicomSeries
from .dicom_seg import check_dicom_seg, require_dicom_seg, write_dicom_seg
from .images import Geometry, read_image, read_probabilities, write_image
from .inputs import IMAGE_ENDINGS, InputCase

OUTPUT_FORMATS = ("nifti", "dicom-seg")
_FIX_FORMAT = "pass a DICOM series folder or zip as -i, or use --output-format nifti"


def _check_format(output_format: str) -> None:
    if output_format not in OUTPUT_FORMATS:
        raise AutosegError(f"--output-format {output_format!r}: choose one of {', '.join(OUTPUT_FORMATS)}")


def require_source_for(output_format: str, source: Path) -> None:
    """Refuse, before any model is loaded, an output format that ``source`` (the ``-i`` path) cannot give: a
    DICOM-SEG refers to the slices of a DICOM series, so a single image file or a folder of image files is refused
    (a zip or a folder without image files is checked case by case by :func:`require_sources`)."""
    _check_format(output_format)
    if output_format != "dicom-seg":
        return
    require_dicom_seg()
    source = Path(source)
    if source.is_file() and not source.name.lower().endswith(".zip"):
        raise AutosegError(f"--output-format dicom-seg: -i {source} is an image file, not a DICOM series; a "
                           f"DICOM-SEG refers to the slices of the series it segments; {_FIX_FORMAT}")
    if source.is_dir():
        images = sorted(p.name for p in source.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_ENDINGS))
        if images:
            raise AutosegError(f"--output-format dicom-seg: -i {source} holds image files ({', '.join(images[:3])}"
                               f"{', ...' if len(images) > 3 else ''}), not a DICOM series; a DICOM-SEG refers to "
                               f"the slices of the series it segments; {_FIX_FORMAT}")


def require_sources(output_format: str, cases: Sequence[InputCase], source: Path) -> None:
    """Refuse, before the first case is predicted, cases the output format cannot be written for."""
    _check_format(output_format)
    if output_format != "dicom-seg":
        return
    require_dicom_seg()
    others = [str(c.images[0]) for c in cases if not isinstance(c, DicomSeries)]
    if others:
        raise AutosegError(f"--output-format dicom-seg: -i {source} gives image files ({', '.join(others[:3])}), "
                           f"not DICOM series; a DICOM-SEG refers to the slices of the series it segments; "
                           f"{_FIX_FORMAT}")


def label_output(out_dir: Path, case_id: str, output_format: str, ending: str) -> Path:
    """Where the label map of ``case_id`` goes: ``CASE<ending>`` (nifti) or ``CASE.dcm`` (dicom-seg)."""
    _check_format(output_format)
    return Path(out_dir) / f"{case_id}{DICOM_SEG_ENDING if output_format == 'dicom-seg' else ending}"


def write_labels(path: Path, labels: np.ndarray, geometry: Geometry, case: InputCase, output_format: str,
                 meta: Mapping[str, Any], parameters: Mapping[str, str] | None = None) -> None:
    """Write one case's label map (on its input grid) in ``output_format``, atomically; ``parameters`` describe
    the model in a DICOM-SEG's algorithm identification."""
    _check_format(output_format)
    if output_format == "nifti":
        write_image(path, labels, geometry)
    elif not isinstance(case, DicomSeries):
        raise AutosegError(f"--output-format dicom-seg: {case.images[0]} is not a DICOM series; {_FIX_FORMAT}")
    else:
        write_dicom_seg(path, labels, case, meta, parameters)


def _readable(path: Path) -> bool:
    try:
        if path.suffix == ".npz":
            read_probabilities(path)
        elif path.name.endswith(DICOM_SEG_ENDING):
            check_dicom_seg(path)
        else:
            read_image(path)
    except (OSError, AutosegError):
        return False
    return True


def record_model(out_dir: Path, case_id: str, model: str, outputs: Sequence[Path]) -> None:
    """Say that ``outputs`` of ``case_id`` were made by ``model`` (an identity string); written after them."""
    write_json(Path(out_dir) / model_record(case_id), {"model": model, "outputs": sorted(p.name for p in outputs)})


def finished(out_dir: Path, case_id: str, outputs: Sequence[Path], inputs: Sequence[Path], model: str) -> bool:
    """Outputs a rerun may keep: each present, newer than every input (an input edited or replaced since is
    predicted again), recorded as made by ``model`` and readable to the end."""
    record_path = Path(out_dir) / model_record(case_id)
    try:
        newest_input = max(p.stat().st_mtime_ns for p in inputs)
        if any(p.stat().st_mtime_ns < newest_input for p in outputs):
            return False
        record = read_json(record_path, "it is rewritten when the case is predicted again")
    except (OSError, AutosegError):
        return False
    if not isinstance(record, dict) or record.get("model") != model or not isinstance(record.get("outputs"), list):
        return False
    if not {p.name for p in outputs} <= set(map(str, record["outputs"])):
        return False
    return all(_readable(p) for p in outputs)
