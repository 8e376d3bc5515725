"""`autoseg convert`: each public dataset's layout, rebuilt in miniature here (a few tiny volumes), converts to a raw
dataset that `plan_and_preprocess --verify` accepts, with the images' geometry and voxels unchanged."""

from __future__ import annotations

import gzip
import json
import shutil as shutil_module
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.cli import main
from autoseg.errors import AutosegError
from autoseg.io.convert import convert_dataset
from autoseg.io.dataset import list_cases, load_dataset_json
from autoseg.io.verify import check_dataset
from autoseg.labels import LabelSpec, labels_from_probabilities


def _volume(path: Path, seed: int, label_values: tuple[int, ...] | None = None) -> None:
    """A 6x7x8 CT (or label) volume with a geometry of its own, written with SimpleITK (``.nii`` or ``.nii.gz``)."""
    rng = np.random.default_rng(seed)
    if label_values is None:
        arr = rng.integers(-1000, 1000, (6, 7, 8)).astype(np.int16)
    else:
        arr = np.zeros((6, 7, 8), np.uint8)
        for i, v in enumerate(label_values):
            arr[1 + i, 2:5, 2:6] = v
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8 + seed / 100, 0.8 + seed / 100, 3.0))
    img.SetOrigin((-100.0 + seed, 20.0, 5.5))
    img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1) if seed % 2 else (1, 0, 0, 0, 1, 0, 0, 0, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def _pairs(cases_src: dict[str, tuple[Path, Path | None]]) -> None:
    for i, (image, label) in enumerate(cases_src.values()):
        _volume(image, i)
        if label is not None:
            _volume(label, i, (1, 2, 3) if "kits23" in str(label) else (1, 2))


def _same_voxels_and_geometry(a: Path, b: Path) -> None:
    ia, ib = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
    assert np.array_equal(sitk.GetArrayFromImage(ia), sitk.GetArrayFromImage(ib))
    assert (ia.GetSpacing(), ia.GetOrigin(), ia.GetDirection()) == (ib.GetSpacing(), ib.GetOrigin(), ib.GetDirection())


def _convert(kind: str, src: Path, dataset_id: int, roots) -> Path:
    assert main(["convert", kind, str(src), "-d", str(dataset_id)]) == 0
    out = next(roots["AUTOSEG_RAW"].glob(f"Dataset{dataset_id:03d}_*"))
    meta = load_dataset_json(out)
    check_dataset(out, [])  # what --verify checks: every file, geometry, label values
    assert meta["channel_names"] == {"0": "CT"} and meta["file_ending"] == ".nii.gz"
    assert meta["numTraining"] == len(list_cases(out, meta))
    return out


def test_kits19(tmp_path, roots, capsys):
    data = tmp_path / "kits19" / "data"
    src = {f"case_{i:05d}": (data / f"case_{i:05d}" / "imaging.nii.gz", data / f"case_{i:05d}" / "segmentation.nii.gz")
           for i in range(3)}
    src["case_00210"] = (data / "case_00210" / "imaging.nii.gz", None)  # a test case: no segmentation
    _pairs(src)
    (data / "kits.json").write_text("[]")
    out = _convert("kits19", tmp_path / "kits19", 40, roots)
    assert out.name == "Dataset040_KiTS19"
    meta = load_dataset_json(out)
    assert meta["labels"] == {"background": 0, "kidney": 1, "kidney_tumor": 2} and meta["numTraining"] == 3
    assert [c.case_id for c in list_cases(out, meta, "Ts")] == ["case_00210"]
    assert (out / "imagesTr" / "case_00001_0000.nii.gz").read_bytes() == src["case_00001"][0].read_bytes()
    assert (out / "labelsTr" / "case_00001.nii.gz").read_bytes() == src["case_00001"][1].read_bytes()
    assert "3 training and 1 test case(s)" in capsys.readouterr().out


def test_kits23_regions_as_nnunet(tmp_path, roots):
    ds = tmp_path / "kits23" / "dataset"
    src = {f"case_{i:05d}": (ds / f"case_{i:05d}" / "imaging.nii.gz", ds / f"case_{i:05d}" / "segmentation.nii.gz")
           for i in (0, 1, 588)}
    _pairs(src)
    (ds / "case_00000" / "instances").mkdir()  # the per-annotator instances are not used
    out = _convert("kits23", tmp_path / "kits23", 220, roots)
    meta = load_dataset_json(out)
    assert out.name == "Dataset220_KiTS23"
    assert meta["labels"] == {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2}
    assert meta["regions_class_order"] == [1, 3, 2]
    n_out, regions, rco = LabelSpec.from_meta(meta).layout()
    assert (n_out, regions, rco) == (3, [[1, 2, 3], [2, 3], [2]], [1, 3, 2])
    # a cyst voxel is in kidney+masses and masses but not tumour: the regions paint it back as 3, a tumour as 2
    probs = np.array([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert labels_from_probabilities(probs, rco).tolist() == [2, 3, 1, 0]
    assert meta["numTraining"] == 3


def test_lits_nii_files_are_compressed_unchanged(tmp_path, roots):
    root = tmp_path / "LiTS"
    src = {"lits_000": (root / "Training Batch 1" / "volume-0.nii", root / "Training Batch 1" / "segmentation-0.nii"),
           "lits_027": (root / "Training Batch 1" / "volume-27.nii", root / "Training Batch 1" / "segmentation-27.nii"),
           "lits_130": (root / "Training Batch 2" / "volume-130.nii",
                        root / "Training Batch 2" / "segmentation-130.nii"),
           "lits_test_005": (root / "Test" / "test-volume-5.nii", None)}
    _pairs(src)
    out = _convert("lits", root, 29, roots)
    meta = load_dataset_json(out)
    assert meta["labels"] == {"background": 0, "liver": 1, "liver_tumor": 2} and meta["numTraining"] == 3
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["lits_000.nii.gz", "lits_027.nii.gz",
                                                                    "lits_130.nii.gz"]
    converted = out / "imagesTr" / "lits_027_0000.nii.gz"
    assert gzip.decompress(converted.read_bytes()) == src["lits_027"][0].read_bytes()  # byte for byte
    _same_voxels_and_geometry(converted, src["lits_027"][0])
    _same_voxels_and_geometry(out / "imagesTs" / "lits_test_005_0000.nii.gz", src["lits_test_005"][0])


def test_msd_liver(tmp_path, roots):
    task = tmp_path / "Task03_Liver"
    src = {f"liver_{i}": (task / "imagesTr" / f"liver_{i}.nii.gz", task / "labelsTr" / f"liver_{i}.nii.gz")
           for i in (0, 1, 10)}
    src["liver_132"] = (task / "imagesTs" / "liver_132.nii.gz", None)
    _pairs(src)
    (task / "imagesTr" / "._liver_0.nii.gz").write_bytes(b"\x00\x05\x16\x07")  # macOS metadata from MSD's tar
    (task / "dataset.json").write_text(json.dumps({
        "name": "Liver", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "numTraining": 3, "training": [], "test": []}))
    out = _convert("msd-liver", task, 3, roots)
    meta = load_dataset_json(out)
    assert meta["labels"] == {"background": 0, "liver": 1, "liver_tumor": 2} and meta["numTraining"] == 3
    assert [c.case_id for c in list_cases(out, meta)] == ["liver_0", "liver_1", "liver_10"]
    assert [c.case_id for c in list_cases(out, meta, "Ts")] == ["liver_132"]


def test_refusals_name_the_problem(tmp_path, roots):
    raw = roots["AUTOSEG_RAW"]
    with pytest.raises(AutosegError, match="folder not found"):
        convert_dataset("kits19", tmp_path / "nowhere", raw, 40)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AutosegError, match="no KiTS19 training cases found"):
        convert_dataset("kits19", tmp_path / "empty", raw, 40)
    with pytest.raises(AutosegError, match="not MSD's dataset.json"):
        convert_dataset("msd-liver", tmp_path / "empty", raw, 3)
    data = tmp_path / "k" / "data"
    _pairs({"c": (data / "case_00000" / "imaging.nii.gz", data / "case_00000" / "segmentation.nii.gz")})
    convert_dataset("kits19", tmp_path / "k", raw, 40)
    with pytest.raises(AutosegError, match="already converted"):
        convert_dataset("kits19", tmp_path / "k", raw, 40)
    with pytest.raises(AutosegError, match="id already used by .*Dataset040_KiTS19"):
        convert_dataset("lits", tmp_path / "k", raw, 40)
    lits = tmp_path / "lits"
    _volume(lits / "segmentation-3.nii", 0, (1,))
    with pytest.raises(AutosegError, match="without their volume-N file"):
        convert_dataset("lits", lits, raw, 29)


# ------------------------------------------------------------------------------------- interrupted and resumed

_DIE_AT_COPY = """
import os, shutil, signal, sys
real, calls = shutil.copyfileobj, []

def copy_then_die(fsrc, fdst, length=0):  # the third file: half of it written, then the process is killed
    calls.append(1)
    if len(calls) == 3:
        fdst.write(fsrc.read(4096))
        fdst.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(fsrc, fdst, length)

shutil.copyfileobj = copy_then_die
from autoseg.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _lits_layout(root: Path) -> Path:
    """Four LiTS training cases and a test case, as uncompressed ``.nii`` (so every copy is a gzip write)."""
    src = {n: (root / "Training Batch 1" / f"volume-{n}.nii", root / "Training Batch 1" / f"segmentation-{n}.nii")
           for n in (0, 3, 27, 130)}
    src[5] = (root / "Test" / "test-volume-5.nii", None)
    _pairs(src)
    return root


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_killed_conversion_resumes_to_the_uninterrupted_result(tmp_path, roots):
    src = _lits_layout(tmp_path / "LiTS")
    reference = convert_dataset("lits", src, tmp_path / "reference", 41)
    run = subprocess.run([sys.executable, "-c", _DIE_AT_COPY, "convert", "lits", str(src), "-d", "41"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == -9, run.stderr  # killed, no cleanup ran
    out = roots["AUTOSEG_RAW"] / reference.name
    left = _tree(out)
    assert "dataset.json" not in left and len(left) == 3  # two files finished, one half-written temporary
    assert len([name for name in left if Path(name).name.startswith(".tmp-")]) == 1
    assert main(["convert", "lits", str(src), "-d", "41"]) == 0
    assert _tree(out) == _tree(reference)  # the same files with the same bytes, nothing half-written left
    check_dataset(out, [])


def test_interrupted_conversion_resumes(tmp_path, roots, monkeypatch):
    """Ctrl-C in the middle of a copy: nothing half-written is kept, and the rerun completes the dataset."""
    src = _lits_layout(tmp_path / "LiTS")
    reference = convert_dataset("lits", src, tmp_path / "reference", 41)
    real, calls = shutil_module.copyfileobj, []

    def interrupt(fsrc, fdst, length=0):
        calls.append(1)
        if len(calls) == 6:
            fdst.write(fsrc.read(4096))
            raise KeyboardInterrupt
        return real(fsrc, fdst, length)

    monkeypatch.setattr(shutil_module, "copyfileobj", interrupt)
    assert main(["convert", "lits", str(src), "-d", "41"]) == 130
    monkeypatch.setattr(shutil_module, "copyfileobj", real)
    out = roots["AUTOSEG_RAW"] / reference.name
    left = _tree(out)
    assert len(left) == 5 and "dataset.json" not in left and not any(".tmp-" in name for name in left)
    assert main(["convert", "lits", str(src), "-d", "41"]) == 0
    assert _tree(out) == _tree(reference)
