"""The phantom is every other module's test data: check it is deterministic, anatomically plausible and written in
the nnU-Net v2 layout with exact geometry."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from autoseg.io.dataset import load_dataset_json
from autoseg.errors import AutosegError
from autoseg.cli.phantom import add_cli
from autoseg.phantom import SIZES, case_seed, generate_case, write_dataset

SEEDS = range(8)  # includes flipped cases (3 and 5); asserted below so the checks keep their meaning
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@pytest.fixture(scope="module")
def small_cases():
    return [generate_case(s, "small") for s in SEEDS]


def test_same_seed_same_case_other_seed_differs():
    a_img, a_lab, a_geo = generate_case(7, "small")
    b_img, b_lab, b_geo = generate_case(7, "small")
    assert a_img.dtype == np.int16 and a_lab.dtype == np.uint8
    assert a_img.tobytes() == b_img.tobytes() and a_lab.tobytes() == b_lab.tobytes()
    assert a_geo == b_geo
    c_img, c_lab, c_geo = generate_case(8, "small")
    assert c_geo != a_geo
    assert a_img.shape != c_img.shape or not np.array_equal(a_img, c_img)
    assert case_seed(0, 1) == case_seed(0, 1)
    assert len({case_seed(s, i) for s in range(3) for i in range(3)}) == 9


def test_every_label_present_and_some_case_tumour_free(small_cases):
    union = set()
    lacks_tumour = 0
    for img, lab, geo in small_cases:
        assert lab.shape == img.shape == geo.shape
        counts = np.bincount(lab.ravel(), minlength=5)
        assert counts.size == 5, f"unexpected label values {np.unique(lab)}"
        assert counts[1] > 100 and counts[3] > 20, f"liver/kidney missing or tiny: {counts}"
        union |= set(np.unique(lab).tolist())
        lacks_tumour += counts[2] == 0 or counts[4] == 0
    assert union == {0, 1, 2, 3, 4}
    assert lacks_tumour >= 1


def test_hounsfield_units_are_realistic(small_cases):
    diffs = []
    for img, lab, _ in small_cases:
        liver, kidney = img[lab == 1], img[lab == 3]
        assert 85 <= np.median(liver) <= 150  # portal-venous liver (real scan: 118 +- 22 HU)
        assert kidney.mean() > liver.mean()  # cortex enhances more than liver (partial volume narrows it)
        corners = np.concatenate([img[:, :3, :3], img[:, :3, -3:], img[:, -3:, :3], img[:, -3:, -3:]], axis=None)
        assert np.median(corners) < -900  # air outside the body
        assert img.min() >= -1024 and img.max() > 300  # CT clip; bone present
        for tumour, organ in ((2, 1), (4, 3)):
            if (lab == tumour).any():
                diffs.append(abs(float(img[lab == tumour].mean()) - float(img[lab == organ].mean())))
    assert len(diffs) >= 6
    # contrast drawn around the real scan's 48 HU, lowered here by partial volume in small tumours
    assert 15 <= np.mean(diffs) <= 60


def test_tumours_are_clinically_sized():
    diameters = []
    for seed in range(4):
        for img, lab, geo in (generate_case(seed, "small"), generate_case(seed, "demo")):
            voxel_mm3 = float(np.prod(geo.spacing))
            for tumour in (2, 4):
                components, n = ndimage.label(lab == tumour)
                sizes = np.bincount(components.ravel())[1:]
                diameters += list((6.0 * sizes * voxel_mm3 / np.pi) ** (1 / 3))
    d = np.array(diameters)
    assert d.size >= 6
    assert np.mean((d >= 3) & (d <= 45)) >= 0.9, np.round(d, 1)


def test_flipped_cases_keep_the_anatomy_in_place(small_cases):
    flipped = 0
    for img, lab, geo in small_cases:
        flipped += geo.direction != IDENTITY
        image = sitk.GetImageFromArray(lab)
        image.SetSpacing(geo.spacing), image.SetOrigin(geo.origin), image.SetDirection(geo.direction)

        def centroid(value):
            zyx = np.argwhere(lab == value).mean(axis=0)
            return np.array(image.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in zyx[::-1])))

        liver, kidney = centroid(1), centroid(3)
        # LPS: the liver lies on the patient's right (smaller x) and above and in front of the kidneys.
        assert liver[0] < -20 and abs(kidney[0]) < 40
        assert liver[2] > kidney[2] and liver[1] < kidney[1]
    assert flipped >= 1


@pytest.mark.parametrize("size", ["small", "demo"])
def test_shapes_and_spacing_within_preset(size):
    preset = SIZES[size]
    spacings = set()
    for seed in range(4 if size == "demo" else 8):
        img, lab, geo = generate_case(seed, size)
        nz, ny, nx = img.shape
        assert preset.slices_range[0] <= nz <= preset.slices_range[1]
        assert preset.inplane_range[0] <= ny <= preset.inplane_range[1]
        assert preset.inplane_range[0] <= nx <= preset.inplane_range[1]
        sx, sy, sz = geo.spacing
        assert sx == sy
        assert 340 <= sx * preset.inplane_nominal <= 390  # body-sized in-plane field of view
        assert 195 <= sz * nz <= 305  # 200-300 mm craniocaudal
        spacings.add(geo.spacing)
    assert len(spacings) > 1
    lo, hi = {"small": (5.5, 6.5), "demo": (2.7, 3.05)}[size]
    assert all(lo <= s[0] <= hi for s in spacings)


def test_write_dataset_layout_and_geometry(tmp_path):
    folder = write_dataset(tmp_path, 3, seed=5, num_test=1)
    assert folder == tmp_path / "Dataset501_AbdomenPhantom"
    meta = json.loads((folder / "dataset.json").read_text())
    assert {"channel_names", "labels", "numTraining", "file_ending", "name", "description"} <= set(meta)
    assert meta["labels"] == {"background": 0, "liver": 1, "liver_tumor": 2, "kidney": 3, "kidney_tumor": 4}
    assert meta["numTraining"] == 3 and meta["channel_names"] == {"0": "CT"}
    load_dataset_json(folder)  # passes the project's own checks
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == ["phantom_003_0000.nii.gz"]
    assert sorted(p.name for p in (folder / "labelsTs").iterdir()) == ["phantom_003.nii.gz"]

    spacings, directions = set(), set()
    for i in range(3):
        image = sitk.ReadImage(str(folder / "imagesTr" / f"phantom_{i:03d}_0000.nii.gz"))
        label = sitk.ReadImage(str(folder / "labelsTr" / f"phantom_{i:03d}.nii.gz"))
        for get in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
            assert getattr(image, get)() == getattr(label, get)(), get
        assert image.GetPixelID() == sitk.sitkInt16 and label.GetPixelID() == sitk.sitkUInt8
        img, lab, geo = generate_case(case_seed(5, i), "small")
        assert np.array_equal(sitk.GetArrayFromImage(image), img)
        assert np.array_equal(sitk.GetArrayFromImage(label), lab)
        assert (image.GetSpacing(), image.GetOrigin(), image.GetDirection()) == (geo.spacing, geo.origin, geo.direction)
        spacings.add(image.GetSpacing())
        directions.add(image.GetDirection())
    assert len(spacings) == 3
    assert any(d != IDENTITY for d in directions)

    # Rewriting gives the same bytes; a smaller rewrite leaves no stale cases behind.
    before = (folder / "imagesTr" / "phantom_001_0000.nii.gz").read_bytes()
    write_dataset(tmp_path, 2, seed=5)
    assert (folder / "imagesTr" / "phantom_001_0000.nii.gz").read_bytes() == before
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    assert not (folder / "imagesTs").exists()
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 2


def test_cli_writes_dataset(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="autoseg")
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["phantom", "-o", str(tmp_path), "--cases", "1", "--seed", "3", "--name", "DsX"])
    assert (args.cases, args.test_cases, args.seed, args.size) == (1, 0, 3, "small")
    assert args.func(args) == 0
    assert (tmp_path / "DsX" / "labelsTr" / "phantom_000.nii.gz").is_file()
    assert str(tmp_path / "DsX") in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["phantom", "-o", str(tmp_path), "--cases", "0"])


def test_bad_arguments_are_reported():
    with pytest.raises(AutosegError, match="size"):
        generate_case(0, "huge")
    with pytest.raises(AutosegError, match="seed"):
        generate_case(-1)
    with pytest.raises(AutosegError, match="training cases"):
        write_dataset("unused", 0, seed=0)
