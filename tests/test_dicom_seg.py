"""`predict --output-format dicom-seg` (issue 14): a DICOM Segmentation that refers to its source series, one named,
coded segment per label, frames that overlay the source slices exactly (the NIfTI prediction voxel for voxel),
resumable like the NIfTI outputs; NIfTI input refused before a model is loaded."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
highdicom = pytest.importorskip("highdicom")

from autoseg.cli import main  # noqa: E402
from autoseg.errors import AutosegError  # noqa: E402
from autoseg.io.dicom import find_series, write_series  # noqa: E402
from autoseg.io.dicom_seg import write_dicom_seg  # noqa: E402
from autoseg.io.images import read_image, write_image  # noqa: E402
from autoseg.labels import DEFAULT_LABELS  # noqa: E402
from autoseg.version import __version__  # noqa: E402
from field_helpers import DATASET, right_handed_case, tiny_model  # noqa: E402

UID_A, UID_B = "1.2.826.0.1.3680043.8.498.101", "1.2.826.0.1.3680043.8.498.202"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SCT = {"liver": "10200004", "kidney": "64033007", "neoplasm": "108369006", "mass": "4147007",
       "anatomical structure": "91723000", "abnormal": "49755003"}


@pytest.fixture()
def model(roots):
    return tiny_model(roots["AUTOSEG_RESULTS"])


@pytest.fixture()
def case(tmp_path):
    image, _, geo = right_handed_case()
    write_series(tmp_path / "series", image, geo, UID_A)
    return tmp_path, image, geo


def _predict(inp: Path, out: Path, *extra: str) -> int:
    return main(["predict", "-i", str(inp), "-o", str(out), "-d", DATASET, "--no-tta", *extra])


def _sources(folder: Path) -> list:
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.iterdir())]


def _labels_from_seg(seg, sources) -> np.ndarray:
    """Rebuild a label map on the source slices from the SEG with pydicom alone: each frame says its segment, its
    source slice (by SOP Instance UID) and its position."""
    by_uid = {s.SOPInstanceUID: i for i, s in enumerate(sources)}
    out = np.zeros((len(sources), int(sources[0].Rows), int(sources[0].Columns)), np.uint8)
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    for frame, groups in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        number = int(groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        uid = groups.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        z = by_uid[uid]
        np.testing.assert_allclose([float(v) for v in groups.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(v) for v in sources[z].ImagePositionPatient], atol=1e-4)
        assert not np.any(out[z][frame > 0]), "segments of a label map do not overlap"
        out[z][frame > 0] = number
    return out


def test_dicom_seg_round_trip_overlays_the_source(model, case):
    root, _, _ = case
    assert _predict(root / "series", root / "nifti") == 0
    assert _predict(root / "series", root / "seg", "--output-format", "dicom-seg") == 0
    assert sorted(p.name for p in (root / "seg").iterdir()) == ["series.dcm", "series.model.json"]
    ref, _ = read_image(root / "nifti" / "series.nii.gz")
    assert len(np.unique(ref)) >= 3  # a real prediction with several labels

    seg = pydicom.dcmread(root / "seg" / "series.dcm")
    sources = _sources(root / "series")
    assert seg.SOPClassUID == SEG_SOP_CLASS and seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID and seg.SeriesInstanceUID != UID_A
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == UID_A
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == \
        {s.SOPInstanceUID for s in sources}
    # one segment per label, named and coded, made by autoseg of this version
    names = [s.SegmentLabel for s in seg.SegmentSequence]
    assert names == [n for n in DEFAULT_LABELS if n != "background"]
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1, 2, 3, 4]
    by_name = {s.SegmentLabel: s for s in seg.SegmentSequence}
    assert by_name["liver"].SegmentedPropertyTypeCodeSequence[0].CodeValue == SCT["liver"]
    assert by_name["kidney"].SegmentedPropertyTypeCodeSequence[0].CodeValue == SCT["kidney"]
    tumour = by_name["kidney_tumor"]
    assert tumour.SegmentedPropertyTypeCodeSequence[0].CodeValue == SCT["neoplasm"]
    assert tumour.SegmentedPropertyCategoryCodeSequence[0].CodeValue == SCT["abnormal"]
    assert tumour.AnatomicRegionSequence[0].CodeValue == SCT["kidney"]
    algorithm = tumour.SegmentationAlgorithmIdentificationSequence[0]
    assert (tumour.SegmentAlgorithmType, algorithm.AlgorithmName, algorithm.AlgorithmVersion) == \
        ("AUTOMATIC", "autoseg", __version__)
    record = json.loads((root / "seg" / "series.model.json").read_text())  # the model is named in both
    assert algorithm.AlgorithmParameters == f"configurations=3d_fullres,model={record['model'][:16]}"
    # the frames overlay the source slices: the NIfTI prediction of the same series, voxel for voxel
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
                               [float(v) for v in sources[0].PixelSpacing])
    np.testing.assert_allclose([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
                               [float(v) for v in sources[0].ImageOrientationPatient], atol=1e-6)
    assert np.array_equal(_labels_from_seg(seg, sources), ref)
    # and highdicom reads it to the same label map by source instance
    back = highdicom.seg.segread(root / "seg" / "series.dcm")
    pixels = back.get_pixels_by_source_instance([s.SOPInstanceUID for s in sources], combine_segments=True)
    assert np.array_equal(pixels, ref)


def test_several_series_and_a_zip_each_get_a_seg_of_their_own(model, case):
    root, image, geo = case
    both = root / "both"
    shutil.copytree(root / "series", both / "s1")
    write_series(both / "s2", image[:, ::-1].copy(), geo, UID_B)
    with zipfile.ZipFile(root / "two.zip", "w") as zf:
        for f in sorted(both.rglob("*.dcm")):
            zf.write(f, f.relative_to(both).as_posix())
    assert _predict(root / "two.zip", root / "out", "--output-format", "dicom-seg") == 0
    assert sorted(p.name for p in (root / "out").glob("*.dcm")) == [f"{UID_A}.dcm", f"{UID_B}.dcm"]
    assert _predict(both / "s2", root / "nifti") == 0
    for uid, folder in ((UID_A, both / "s1"), (UID_B, both / "s2")):
        seg = pydicom.dcmread(root / "out" / f"{uid}.dcm")
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
        labels = _labels_from_seg(seg, _sources(folder))
        if uid == UID_B:
            assert np.array_equal(labels, read_image(root / "nifti" / "s2.nii.gz")[0])


def test_nifti_input_is_refused_before_any_work(model, case, capsys):
    root, image, geo = case
    write_image(root / "nifti_in" / "scan_0000.nii.gz", image, geo)
    write_image(root / "scan.nrrd", image, geo)
    for source in (root / "nifti_in", root / "scan.nrrd"):
        capsys.readouterr()
        assert _predict(source, root / "out", "--output-format", "dicom-seg") == 1
        captured = capsys.readouterr()
        assert "--output-format dicom-seg" in captured.err and str(source) in captured.err
        assert "--output-format nifti" in captured.err  # the fix
        assert "precision" not in captured.out  # no model was loaded
        assert not (root / "out").exists()


def test_unknown_output_format_is_a_usage_error(model, case):
    root, _, _ = case
    with pytest.raises(SystemExit) as e:
        _predict(root / "series", root / "out", "--output-format", "png")
    assert e.value.code == 2


def test_dicom_seg_rerun_skips_finished_and_redoes_broken(model, case):
    root, _, _ = case
    out = root / "seg"
    assert _predict(root / "series", out, "--output-format", "dicom-seg") == 0
    first = (out / "series.dcm").read_bytes()
    stamp = (out / "series.dcm").stat().st_mtime_ns
    assert _predict(root / "series", out, "--output-format", "dicom-seg") == 0
    assert (out / "series.dcm").stat().st_mtime_ns == stamp  # finished: kept
    (out / "series.dcm").write_bytes(first[: len(first) // 2])  # cut off, as by a full disk
    assert _predict(root / "series", out, "--output-format", "dicom-seg") == 0
    again = pydicom.dcmread(out / "series.dcm")
    assert np.array_equal(again.pixel_array, pydicom.dcmread(pydicom.filebase.DicomBytesIO(first)).pixel_array)
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    (out / "series.dcm").write_bytes(b"not DICOM at all")
    assert _predict(root / "series", out, "--output-format", "dicom-seg") == 0
    assert pydicom.dcmread(out / "series.dcm").Modality == "SEG"


def test_region_labels_are_one_segment_each_with_all_their_values(tmp_path):
    """KiTS23's regions: kidney = 1, 2, 3 / masses = 2, 3 / tumor = 2 overlap, so each is its own binary mask."""
    image, _, geo = right_handed_case()
    write_series(tmp_path / "series", image, geo, UID_A)
    (series,) = find_series(tmp_path / "series")
    labels = np.zeros(image.shape, np.uint8)
    labels[5:15, 10:30, 10:30] = 1
    labels[8:12, 15:25, 15:20] = 2
    labels[8:12, 15:25, 22:26] = 3
    meta = {"labels": {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2},
            "regions_class_order": [1, 3, 2], "channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}
    write_dicom_seg(tmp_path / "kits.dcm", labels, series, meta)
    seg = highdicom.seg.segread(tmp_path / "kits.dcm")
    names = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
    assert names == {1: "kidney", 2: "masses", 3: "tumor"}
    codes = {s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence}
    assert codes == {"kidney": SCT["kidney"], "masses": SCT["mass"], "tumor": SCT["neoplasm"]}
    uids = [s.SOPInstanceUID for s in _sources(tmp_path / "series")]
    masks = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2, 3])
    for k, values in enumerate(([1, 2, 3], [2, 3], [2])):
        assert np.array_equal(masks[..., k].astype(bool), np.isin(labels, values))


def test_source_without_frame_of_reference_is_refused_by_name(tmp_path):
    image, _, geo = right_handed_case()
    write_series(tmp_path / "series", image, geo, UID_A)
    for f in (tmp_path / "series").iterdir():
        ds = pydicom.dcmread(f)
        del ds.FrameOfReferenceUID
        ds.save_as(f)
    (series,) = find_series(tmp_path / "series")
    meta = {"labels": DEFAULT_LABELS, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}
    with pytest.raises(AutosegError, match="FrameOfReferenceUID.*--output-format nifti"):
        write_dicom_seg(tmp_path / "x.dcm", np.zeros(image.shape, np.uint8), series, meta)
    assert not (tmp_path / "x.dcm").exists()


def test_api_saves_a_dicom_seg_of_a_series_only(model, case):
    import autoseg

    root, image, geo = case
    loaded = autoseg.load_model(model, device="cpu", mirror=False)  # as --no-tta
    seg = loaded.segment(root / "series")
    seg.save(root / "api.dcm")
    assert _predict(root / "series", root / "cli", "--output-format", "dicom-seg") == 0
    sources = _sources(root / "series")
    from_api = _labels_from_seg(pydicom.dcmread(root / "api.dcm"), sources)
    assert np.array_equal(from_api, _labels_from_seg(pydicom.dcmread(root / "cli" / "series.dcm"), sources))
    assert np.array_equal(from_api, seg.labels)
    with pytest.raises(AutosegError, match="not of a DICOM series; save it as .nii.gz"):
        loaded.segment(image.astype(np.float32), spacing=geo.spacing_zyx).save(root / "array.dcm")
