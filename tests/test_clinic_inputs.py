"""What `predict -i` and `autoseg.segment` accept (issue 14): a single file of any name, a DICOM series folder or
zip (several series: one output each, named by SeriesInstanceUID), a SimpleITK image or a numpy array; broken series
are refused by name; the API returns what `predict` writes; the sliding window reports its tiles."""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import autoseg
from autoseg.cli import main
from autoseg.errors import AutosegError
from autoseg.io.dicom import find_series, write_series
from autoseg.io.images import read_image, write_image
from autoseg.inference.predictor import sliding_window
from field_helpers import DATASET, POSTPROCESSING, REPO, right_handed_case, tiny_model

UID_A, UID_B = "1.2.826.0.1.3680043.8.498.101", "1.2.826.0.1.3680043.8.498.202"


@pytest.fixture()
def model(roots):
    return tiny_model(roots["AUTOSEG_RESULTS"])


@pytest.fixture()
def case(tmp_path):
    """The same volume as NIfTI (nnU-Net name), as an .mha of another name, and as a DICOM series."""
    image, _, geo = right_handed_case()
    nifti_dir = tmp_path / "nifti"
    write_image(nifti_dir / "scan_0000.nii.gz", image, geo)
    write_image(tmp_path / "Patient X.mha", image, geo)
    write_series(tmp_path / "series", image, geo, UID_A)
    return tmp_path, image, geo


def _predict(inp: Path, out: Path, *extra: str) -> int:
    return main(["predict", "-i", str(inp), "-o", str(out), "-d", DATASET, "--no-tta", *extra])


def _written(folder: Path) -> list[str]:
    """The predictions in ``folder``, without the model records beside them."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".model.json"))


def _labels(path: Path) -> np.ndarray:
    return read_image(path)[0]


def test_dicom_series_predicts_the_labels_of_its_nifti(model, case):
    root, image, geo = case
    assert _predict(root / "nifti", root / "out_nifti") == 0
    assert _predict(root / "series", root / "out_dicom") == 0
    assert _written(root / "out_dicom") == ["series.nii.gz"]  # named after the folder
    ref, ref_geo = read_image(root / "out_nifti" / "scan.nii.gz")
    seg, seg_geo = read_image(root / "out_dicom" / "series.nii.gz")
    assert np.array_equal(seg, ref) and len(np.unique(ref)) > 1
    assert not seg_geo.differences(ref_geo)  # the series' grid, equal to the NIfTI's up to DICOM's decimal strings
    np.testing.assert_allclose(seg_geo.origin, geo.origin, atol=1e-4)


def test_dicom_file_names_do_not_matter(model, case):
    """GDCM orders slices by position, so a folder of renamed files is the same series."""
    root, _, _ = case
    renamed = root / "renamed"
    renamed.mkdir()
    files = sorted((root / "series").iterdir())
    for i, f in enumerate(files):
        shutil.copy(f, renamed / f"x{(i * 7919) % 1000:03d}")  # no extension, scrambled order
    assert _predict(root / "series", root / "a") == 0 and _predict(renamed, root / "b") == 0
    assert np.array_equal(_labels(root / "a" / "series.nii.gz"), _labels(root / "b" / "renamed.nii.gz"))


def test_several_series_one_output_each_named_by_uid_and_zip(model, case):
    root, image, geo = case
    both = root / "both"
    shutil.copytree(root / "series", both / "s1")
    write_series(both / "s2", image[:, ::-1].copy(), geo, UID_B)
    flat = root / "flat"
    flat.mkdir()
    for sub in ("s1", "s2"):
        for f in (both / sub).iterdir():
            shutil.copy(f, flat / f"{sub}_{f.name}")
    assert {s.uid for s in find_series(flat)} == {UID_A, UID_B}
    assert _predict(flat, root / "out") == 0
    assert _written(root / "out") == sorted([f"{UID_A}.nii.gz", f"{UID_B}.nii.gz"])
    assert _predict(root / "series", root / "single") == 0
    assert np.array_equal(_labels(root / "out" / f"{UID_A}.nii.gz"), _labels(root / "single" / "series.nii.gz"))
    # a zip of one series is named after the zip; of two, by UID (folders inside the zip are searched)
    with zipfile.ZipFile(root / "CT 1.zip", "w") as zf:
        for f in sorted((root / "series").iterdir()):
            zf.write(f, f"DICOM/{f.name}")
    assert _predict(root / "CT 1.zip", root / "zipped") == 0
    assert np.array_equal(_labels(root / "zipped" / "CT 1.nii.gz"), _labels(root / "single" / "series.nii.gz"))
    with zipfile.ZipFile(root / "two.zip", "w") as zf:
        for f in sorted(both.rglob("*.dcm")):
            zf.write(f, f.relative_to(both).as_posix())
    assert _predict(root / "two.zip", root / "zipped2") == 0
    assert _written(root / "zipped2") == sorted([f"{UID_A}.nii.gz", f"{UID_B}.nii.gz"])


def _retag(path: Path, key: str, value: str) -> None:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    image = reader.Execute()
    image.SetMetaData(key, value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(path))
    writer.Execute(image)


def _position(path: Path) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader.GetMetaData("0020|0032")


def test_shuffled_and_incomplete_series_are_refused_by_name(model, case, capsys):
    root, _, _ = case
    shuffled = root / "shuffled"
    shutil.copytree(root / "series", shuffled)
    a, b = shuffled / "IM00005.dcm", shuffled / "IM00010.dcm"
    pa, pb = _position(a), _position(b)
    _retag(a, "0020|0032", pb)
    _retag(b, "0020|0032", pa)
    capsys.readouterr()
    assert _predict(shuffled, root / "out1") == 1
    err = capsys.readouterr().err
    assert f"DICOM series {UID_A}" in err and "out of order" in err and "IM00010.dcm" in err, err
    assert not (root / "out1" / "shuffled.nii.gz").exists()
    incomplete = root / "incomplete"
    shutil.copytree(root / "series", incomplete)
    (incomplete / "IM00012.dcm").unlink()
    assert _predict(incomplete, root / "out2") == 1
    err = capsys.readouterr().err
    assert re.search(r"slice gap between IM00011\.dcm and IM00013\.dcm is [\d.]+ mm", err), err
    assert "slices are missing" in err and not (root / "out2" / "incomplete.nii.gz").exists()


def test_zip_with_path_escape_is_refused(model, case, capsys):
    root, _, _ = case
    with zipfile.ZipFile(root / "evil.zip", "w") as zf:
        zf.writestr("../escape.dcm", b"x")
    assert _predict(root / "evil.zip", root / "out") == 1
    assert "points outside the archive" in capsys.readouterr().err
    assert not (root.parent / "escape.dcm").exists()


def test_single_file_of_any_name(model, case):
    root, _, _ = case
    assert _predict(root / "Patient X.mha", root / "out") == 0
    assert _predict(root / "nifti" / "scan_0000.nii.gz", root / "out") == 0  # the nnU-Net name works alone too
    assert _predict(root / "nifti", root / "ref") == 0
    ref = _labels(root / "ref" / "scan.nii.gz")
    assert np.array_equal(_labels(root / "out" / "Patient X.nii.gz"), ref)
    assert np.array_equal(_labels(root / "out" / "scan.nii.gz"), ref)
    # a folder of any names, for a one-channel model
    shutil.copy(root / "Patient X.mha", root / "nifti" / "other.mha")
    assert _predict(root / "nifti", root / "mixed") == 0
    assert _written(root / "mixed") == ["other.nii.gz", "scan.nii.gz"]


def test_single_file_needs_a_one_channel_model(case):
    from autoseg.io.inputs import find_inputs

    root, _, _ = case
    with pytest.raises(AutosegError, match="needs 2 channels per case; pass the folder"):
        find_inputs(root / "Patient X.mha", ".nii.gz", 2)
    with pytest.raises(AutosegError, match="is one channel but the model needs 2"):
        find_inputs(root / "series", ".nii.gz", 2)


def test_api_on_every_input_kind_equals_predict(model, case):
    root, image, geo = case
    assert _predict(root / "nifti", root / "ref") == 0
    ref, ref_geo = read_image(root / "ref" / "scan.nii.gz")
    loaded = autoseg.load_model(model, mirror=False)
    sitk_image = sitk.ReadImage(str(root / "Patient X.mha"))
    results = {
        "file": loaded.segment(root / "Patient X.mha"),
        "folder": loaded.segment(root / "nifti"),
        "dicom": loaded.segment(root / "series"),
        "sitk": loaded.segment(sitk_image),
        "numpy": loaded.segment(image, spacing=geo.spacing_zyx, origin=geo.origin, direction=geo.direction),
    }
    for kind, seg in results.items():
        assert np.array_equal(seg.labels, ref), kind  # postprocessing of the inference plan applied, as predict does
        assert seg.labels.shape == image.shape and seg.labels.dtype == np.uint8, kind
    assert results["file"].geometry == ref_geo and results["folder"].case_id == "scan"
    out = results["sitk"].to_sitk()
    assert out.GetOrigin() == sitk_image.GetOrigin() and out.GetDirection() == sitk_image.GetDirection()
    with_probs = loaded.segment(sitk_image, probabilities=True, postprocess=False)
    assert with_probs.probabilities.shape == (5, *image.shape)
    raw = with_probs.probabilities.argmax(0).astype(np.uint8)
    assert np.array_equal(with_probs.labels, raw)
    from autoseg.inference.postprocess import apply_postprocessing

    assert np.array_equal(apply_postprocessing(raw, POSTPROCESSING), ref)
    # a numpy array in array order without spacing, identity geometry
    flat = loaded.segment(image, spacing=geo.spacing_zyx)
    assert flat.geometry.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def test_api_errors_name_the_problem(model, case):
    root, image, _ = case
    with pytest.raises(AutosegError, match=r"spacing=\(z, y, x\)"):
        autoseg.segment(image, model=model)
    with pytest.raises(AutosegError, match="model not found"):
        autoseg.segment(root / "Patient X.mha", model=root / "nope.zip")
    loaded = autoseg.load_model(model, mirror=False)
    with pytest.raises(AutosegError, match="holds 2 cases"):
        shutil.copy(root / "Patient X.mha", root / "nifti" / "second.mha")
        loaded.segment(root / "nifti")
    bad = image.astype(np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(AutosegError, match="1 NaN/Inf"):
        loaded.segment(bad, spacing=(5.0, 1.0, 1.0))


def test_readme_example_runs(model, case, monkeypatch):
    """The README's Python API section, executed as written (scan.nii.gz and model.zip made here)."""
    root, _, _ = case
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    write_image(root / "scan.nii.gz", *read_image(root / "Patient X.mha"))
    assert main(["export", "-d", DATASET, "-o", str(root / "model.zip")]) == 0
    monkeypatch.chdir(root)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (root / "scan_labels.nii.gz").is_file()
    assert np.array_equal(_labels(root / "scan_labels.nii.gz"), namespace["seg"].labels)


def test_sliding_window_reports_every_tile():
    calls = []
    net = torch.nn.Conv3d(1, 2, 1)
    out = sliding_window(net.eval(), torch.zeros(1, 20, 20, 20), (8, 8, 8), 2, step=0.5, tile_batch=3,
                         progress=lambda done, total: calls.append((done, total)))
    assert out.shape == (2, 20, 20, 20)
    total = calls[0][1]
    assert total == 4 ** 3  # ceil((20 - 8) / 4) + 1 = 4 starts per axis
    assert [d for d, _ in calls] == list(range(3, total, 3)) + [total] and {t for _, t in calls} == {total}
