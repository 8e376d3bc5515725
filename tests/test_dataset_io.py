"""Tests for autoseg.io (reading, writing, dataset.json, verify_dataset), autoseg.layout and autoseg.atomic.

Every dataset here is tiny (8 x 10 x 12 voxels) and built in tmp_path with SimpleITK.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.atomic import TMP_MARK, atomic_path
from autoseg.io.dataset import Case, list_cases, load_dataset_json, read_case
from autoseg.io.images import Geometry, read_header, read_image, write_image
from autoseg.io.nifti import nifti_scan
from autoseg.io.verify import check_dataset, verify_dataset
from autoseg.errors import AutosegError, DatasetError
from autoseg.cli.common import env_roots
from autoseg.layout import Roots, dataset_name

SHAPE = (8, 10, 12)  # (z, y, x)
SPACING = (1.0, 1.0, 2.5)  # (x, y, z)
ORIGIN = (0.0, 0.0, 0.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
FLIP_PERM = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0, -1.0, 0.0, 0.0)  # a proper rotation (det +1), exact in every format


# ------------------------------------------------------------------------------------------------ helpers


def write_volume(path: Path, array: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=IDENTITY) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return path


def image_array(seed: int = 0, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).normal(100.0, 20.0, size=shape).astype(np.float32)


def label_array(shape=SHAPE) -> np.ndarray:
    seg = np.zeros(shape, np.uint8)
    seg[2:5, 3:7, 4:9] = 1
    seg[3:4, 4:6, 5:7] = 2
    return seg


def make_dataset(tmp_path: Path, n_cases: int = 2, **overrides) -> Path:
    """A valid nnU-Net v2 raw dataset under ``tmp_path``; ``overrides`` replace dataset.json keys
    (``channel_names``, ``labels``, ``numTraining``, ``file_ending``)."""
    folder = tmp_path / "Dataset501_Test"
    meta = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "liver": 1, "tumour": 2},
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
    }
    meta.update(overrides)
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps(meta))
    ending = meta["file_ending"]
    for i in range(n_cases):
        case_id = f"case_{i:03d}"
        for c in range(len(meta["channel_names"])):
            write_volume(folder / "imagesTr" / f"{case_id}_{c:04d}{ending}", image_array(10 * i + c))
        write_volume(folder / "labelsTr" / f"{case_id}{ending}", label_array())
    return folder


def one_problem(problems: list[str], substring: str) -> str:
    hits = [p for p in problems if substring in p]
    assert len(hits) == 1, f"expected exactly one problem containing {substring!r}, got {problems}"
    return hits[0]


@pytest.fixture
def ds(tmp_path: Path) -> Path:
    return make_dataset(tmp_path)


# ------------------------------------------------------------------------------------------------ verify_dataset


def test_valid_dataset_has_no_problems_and_no_warnings(ds):
    warnings: list[str] = []
    assert verify_dataset(ds, warnings=warnings) == []
    assert warnings == []
    meta = check_dataset(ds)
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"


def test_valid_multichannel_dataset(tmp_path):
    folder = make_dataset(tmp_path, channel_names={"0": "T1", "1": "T2"})
    assert verify_dataset(folder) == []


def test_check_dataset_raises_with_all_problems(ds):
    (ds / "imagesTr" / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError) as info:
        check_dataset(ds)
    assert len(info.value.problems) == 1
    assert "imagesTr/notes.txt: stray file" in info.value.problems[0]
    assert "1 problem(s) found in the dataset" in str(info.value)


def test_check_dataset_raises_for_bad_dataset_json(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "dataset.json").write_text("{")
    with pytest.raises(DatasetError, match="not valid JSON"):
        check_dataset(folder)


def test_verify_without_meta_returns_dataset_json_problems(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    problems = verify_dataset(folder)
    assert len(problems) == 1
    assert "dataset.json: file not found" in problems[0]


def test_shape_mismatch(ds):
    write_volume(ds / "labelsTr" / "case_000.nii.gz", np.zeros((8, 10, 13), np.uint8))
    problems = verify_dataset(ds)
    msg = one_problem(problems, "shape")
    assert msg.startswith(
        "labelsTr/case_000.nii.gz: shape (8, 10, 13) differs from image imagesTr/case_000_0000.nii.gz (8, 10, 12)"
    )
    assert "resample the label onto the image grid" in msg


def test_spacing_mismatch_message(ds):
    write_volume(ds / "labelsTr" / "case_000.nii.gz", label_array(), spacing=(1.0, 1.0, 3.0))
    problems = verify_dataset(ds)
    assert problems == [
        "labelsTr/case_000.nii.gz: spacing (1.0, 1.0, 3.0) differs from image imagesTr/case_000_0000.nii.gz "
        "(1.0, 1.0, 2.5) beyond tolerance 1e-4; resample the label onto the image grid"
    ]


def test_spacing_within_tolerance_is_accepted(ds):
    write_volume(ds / "labelsTr" / "case_000.nii.gz", label_array(), spacing=(1.0, 1.0, 2.5 * (1 + 4e-5)))
    assert verify_dataset(ds) == []


def test_origin_mismatch_between_channels(tmp_path):
    folder = make_dataset(tmp_path, channel_names={"0": "T1", "1": "T2"})
    write_volume(folder / "imagesTr" / "case_001_0001.nii.gz", image_array(), origin=(0.0, 0.0, 5.0))
    problems = verify_dataset(folder)
    assert problems == [
        "imagesTr/case_001_0001.nii.gz: origin (0.0, 0.0, 5.0) differs from channel 0 "
        "imagesTr/case_001_0000.nii.gz (0.0, 0.0, 0.0) beyond tolerance 1e-4; "
        "resample this channel onto the grid of channel 0"
    ]


def test_origin_tolerance_is_relative_to_magnitude(ds):
    # 1000 * 5e-5 = 0.05 mm: within 1e-4 relative of 1000, so accepted
    for name in ("imagesTr/case_000_0000.nii.gz", "labelsTr/case_000.nii.gz"):
        arr = image_array() if name.startswith("images") else label_array()
        write_volume(ds / name, arr, origin=(1000.0, 0.0, 0.0) if "images" in name else (1000.0625, 0.0, 0.0))
    assert verify_dataset(ds) == []
    write_volume(ds / "labelsTr/case_000.nii.gz", label_array(), origin=(1000.25, 0.0, 0.0))
    msg = one_problem(verify_dataset(ds), "origin")
    assert "origin (1000.25, 0.0, 0.0) differs from image imagesTr/case_000_0000.nii.gz (1000.0, 0.0, 0.0)" in msg


def test_direction_mismatch(ds):
    write_volume(ds / "labelsTr" / "case_001.nii.gz", label_array(), direction=FLIP_PERM)
    msg = one_problem(verify_dataset(ds), "direction")
    assert msg.startswith(f"labelsTr/case_001.nii.gz: direction {FLIP_PERM} differs from image ")
    assert f"imagesTr/case_001_0000.nii.gz {IDENTITY} beyond tolerance 1e-3" in msg


def test_missing_channel(tmp_path):
    folder = make_dataset(tmp_path, channel_names={"0": "T1", "1": "T2"})
    (folder / "imagesTr" / "case_001_0001.nii.gz").unlink()
    problems = verify_dataset(folder)
    assert problems == [
        "case case_001: channel 1 ('T2') missing: expected imagesTr/case_001_0001.nii.gz; add the file "
        "(dataset.json declares 2 channel(s))"
    ]


def test_missing_label(ds):
    (ds / "labelsTr" / "case_001.nii.gz").unlink()
    msg = one_problem(verify_dataset(ds), "no label file")
    assert msg.startswith("case case_001: no label file, expected labelsTr/case_001.nii.gz")


def test_missing_labels_folder(ds):
    for p in (ds / "labelsTr").iterdir():
        p.unlink()
    (ds / "labelsTr").rmdir()
    problems = verify_dataset(ds)
    assert len(problems) == 1
    assert problems[0].startswith(f"labelsTr/: folder not found in {ds}")


def test_orphan_label(ds):
    write_volume(ds / "labelsTr" / "case_999.nii.gz", label_array())
    problems = verify_dataset(ds)
    assert len(problems) == 1
    assert problems[0].startswith(
        "labelsTr/case_999.nii.gz: orphan label, no image imagesTr/case_999_0000.nii.gz for case 'case_999'"
    )


def test_orphan_label_with_channel_suffix_gets_a_hint(ds):
    write_volume(ds / "labelsTr" / "case_000_0000.nii.gz", label_array())
    msg = one_problem(verify_dataset(ds), "orphan label")
    assert "should it be labelsTr/case_000.nii.gz?" in msg


@pytest.mark.parametrize(
    "name", ["notes.txt", "case_000_0000.nii", "case_000_000.nii.gz", ".DS_Store", "._case_000_0000.nii.gz"]
)
def test_stray_file_in_images(ds, name):
    (ds / "imagesTr" / name).write_bytes(b"x")
    problems = verify_dataset(ds)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"imagesTr/{name}: stray file, not named CASE_XXXX.nii.gz")
    assert "dataset.json file_ending is '.nii.gz'" in problems[0]


def test_leftover_temporary_is_reported(ds):
    (ds / "imagesTr" / f"{TMP_MARK}1234abcd-case_000_0000.nii.gz").write_bytes(b"x")
    (ds / "labelsTr" / f"{TMP_MARK}1234abcd-case_000.nii.gz").write_bytes(b"x")
    assert verify_dataset(ds) == [
        f"imagesTr/{TMP_MARK}1234abcd-case_000_0000.nii.gz: leftover temporary file of an interrupted write; delete it",
        f"labelsTr/{TMP_MARK}1234abcd-case_000.nii.gz: leftover temporary file of an interrupted write; delete it",
    ]


def test_stray_file_in_labels(ds):
    (ds / "labelsTr" / "readme.md").write_text("x")
    problems = verify_dataset(ds)
    assert len(problems) == 1
    assert problems[0].startswith("labelsTr/readme.md: stray file, not named CASE.nii.gz")


def test_unexpected_channel_index(ds):
    write_volume(ds / "imagesTr" / "case_000_0003.nii.gz", image_array())
    problems = verify_dataset(ds)
    assert problems == [
        "imagesTr/case_000_0003.nii.gz: unexpected channel 3 for case case_000: dataset.json declares 1 channel(s) "
        "(indices 0..0); remove the file or declare the channel in 'channel_names'"
    ]


def test_case_ids_differing_only_in_letter_case(ds):
    write_volume(ds / "imagesTr" / "CASE_000_0000.nii.gz", image_array())
    write_volume(ds / "labelsTr" / "CASE_000.nii.gz", label_array())
    (ds / "dataset.json").write_text(json.dumps({**json.loads((ds / "dataset.json").read_text()), "numTraining": 3}))
    problems = verify_dataset(ds)
    assert problems == [
        "imagesTr/: duplicate case ids 'CASE_000', 'case_000' differ only in letter case; rename all but one "
        "(they collide on case-insensitive file systems)"
    ]


def test_truncated_nii_gz(ds):
    path = ds / "imagesTr" / "case_000_0000.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = one_problem(verify_dataset(ds), "case_000_0000")
    assert msg.startswith("imagesTr/case_000_0000.nii.gz: file is truncated or corrupt (gzip stream ends early")
    with pytest.raises(AutosegError, match="truncated or corrupt"):
        read_image(path)


def test_truncated_uncompressed_nii(tmp_path):
    folder = make_dataset(tmp_path, file_ending=".nii")
    assert verify_dataset(folder) == []
    path = folder / "labelsTr" / "case_001.nii"
    path.write_bytes(path.read_bytes()[:-100])
    problems = verify_dataset(folder)
    expected = 352 + 8 * 10 * 12  # header + uint8 voxels
    assert problems == [
        f"labelsTr/case_001.nii: file is truncated or corrupt (holds {expected - 100} bytes, header promises "
        f"{expected}); re-export or copy it again from the source"
    ]


def test_truncated_mha(tmp_path):
    folder = make_dataset(tmp_path, file_ending=".mha")
    path = folder / "imagesTr" / "case_000_0000.mha"
    path.write_bytes(path.read_bytes()[:-200])
    msg = one_problem(verify_dataset(folder), "case_000_0000")
    assert msg.startswith("imagesTr/case_000_0000.mha: cannot be read as an image")


def test_garbage_file(ds):
    (ds / "imagesTr" / "case_001_0000.nii.gz").write_bytes(b"definitely not an image")
    problems = verify_dataset(ds)
    assert len(problems) == 1
    assert problems[0].startswith("imagesTr/case_001_0000.nii.gz: cannot be read as an image (")


def test_2d_image(ds):
    write_volume(ds / "imagesTr" / "case_000_0000.nii.gz", np.zeros((10, 12), np.float32), (1.0, 1.0), (0.0, 0.0),
                 (1.0, 0.0, 0.0, 1.0))
    problems = verify_dataset(ds)
    assert problems == [
        "imagesTr/case_000_0000.nii.gz: image is 2D (size (12, 10)); autoseg needs 3D volumes, one file per channel "
        "(split 4D files into _0000, _0001, ...)"
    ]


def test_4d_image(ds):
    series = sitk.JoinSeries([sitk.GetImageFromArray(image_array(i)) for i in range(2)])
    sitk.WriteImage(series, str(ds / "imagesTr" / "case_001_0000.nii.gz"), True)
    problems = verify_dataset(ds)
    assert len(problems) == 1
    assert problems[0].startswith("imagesTr/case_001_0000.nii.gz: image is 4D (size (12, 10, 8, 2))")


def test_undeclared_label_values(ds):
    seg = label_array()
    seg[0, 0, 0], seg[0, 0, 1] = 7, 5
    write_volume(ds / "labelsTr" / "case_001.nii.gz", seg)
    problems = verify_dataset(ds)
    assert problems == [
        "labelsTr/case_001.nii.gz: label values [5, 7] are not declared in dataset.json 'labels' "
        "(declared: [0, 1, 2]); declare them in 'labels' or fix the label map"
    ]


def test_region_labels_count_as_declared(tmp_path):
    folder = make_dataset(tmp_path, labels={"background": 0, "kidney": [1, 2], "tumour": 2})
    assert verify_dataset(folder) == []


def test_non_integer_float_label(ds):
    write_volume(ds / "labelsTr" / "case_000.nii.gz", label_array().astype(np.float32) * 0.5)
    msg = one_problem(verify_dataset(ds), "non-integer")
    assert msg.startswith("labelsTr/case_000.nii.gz: label map holds ")
    assert "non-integer voxel value(s) (e.g. 0.5)" in msg


def test_nan_in_image(ds):
    img = image_array()
    img[0, 0, :3] = np.nan
    write_volume(ds / "imagesTr" / "case_001_0000.nii.gz", img)
    problems = verify_dataset(ds)
    assert len(problems) == 1
    assert problems[0].startswith("imagesTr/case_001_0000.nii.gz: 3 NaN voxel(s) out of 960; replace them")


def test_inf_in_image(ds):
    img = image_array()
    img[1, 1, 1], img[2, 2, 2] = np.inf, -np.inf
    write_volume(ds / "imagesTr" / "case_000_0000.nii.gz", img)
    problems = verify_dataset(ds)
    assert len(problems) == 1
    assert problems[0].startswith("imagesTr/case_000_0000.nii.gz: 2 Inf voxel(s) out of 960; replace them")


def test_num_training_mismatch(tmp_path):
    folder = make_dataset(tmp_path, numTraining=5)
    assert verify_dataset(folder) == [
        "dataset.json: numTraining is 5 but imagesTr/ holds 2 case(s); set numTraining to 2 or add/remove cases"
    ]


def test_empty_images_folder(ds):
    for p in (ds / "imagesTr").iterdir():
        p.unlink()
    problems = verify_dataset(ds)
    assert problems[0] == (
        "imagesTr/: holds no case (no file named CASE_XXXX.nii.gz) while dataset.json declares numTraining=2; "
        "add the training images"
    )
    assert sum("orphan label" in p for p in problems) == 2
    assert not any("numTraining is" in p for p in problems)


def test_missing_images_folder(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0}, "numTraining": 1, "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(meta))
    problems = verify_dataset(folder)
    assert len(problems) == 1
    assert problems[0].startswith(f"imagesTr/: folder not found in {folder}")


def test_all_background_label_is_a_warning_only(ds):
    write_volume(ds / "labelsTr" / "case_001.nii.gz", np.zeros(SHAPE, np.uint8))
    warnings: list[str] = []
    assert verify_dataset(ds, warnings=warnings) == []
    assert warnings == [
        "labelsTr/case_001.nii.gz: label map is all background (only value 0); allowed, but this case adds no "
        "foreground examples"
    ]
    assert verify_dataset(ds) == []  # no warnings list given: still fine
    assert check_dataset(ds)["numTraining"] == 2


def test_all_problems_are_reported_together(tmp_path):
    folder = make_dataset(tmp_path, n_cases=3, numTraining=4)
    write_volume(folder / "labelsTr" / "case_000.nii.gz", np.zeros((8, 10, 13), np.uint8))
    img = image_array()
    img[0, 0, 0] = np.nan
    write_volume(folder / "imagesTr" / "case_001_0000.nii.gz", img)
    (folder / "imagesTr" / "notes.txt").write_text("x")
    (folder / "labelsTr" / "case_002.nii.gz").unlink()
    problems = verify_dataset(folder)
    assert len(problems) == 5, problems
    assert problems[0].startswith("dataset.json: numTraining is 4 but imagesTr/ holds 3 case(s)")
    assert problems[1].startswith("imagesTr/notes.txt: stray file")
    assert problems[2].startswith("labelsTr/case_000.nii.gz: shape (8, 10, 13)")
    assert problems[3].startswith("imagesTr/case_001_0000.nii.gz: 1 NaN voxel(s)")
    assert problems[4].startswith("case case_002: no label file")
    with pytest.raises(DatasetError) as info:
        check_dataset(folder)
    assert info.value.problems == problems


def test_parallel_verification_matches_sequential(tmp_path):
    folder = make_dataset(tmp_path, n_cases=3)
    write_volume(folder / "labelsTr" / "case_002.nii.gz", label_array(), spacing=(1.0, 1.0, 3.0))
    write_volume(folder / "labelsTr" / "case_000.nii.gz", np.zeros(SHAPE, np.uint8))
    img = image_array()
    img[0, 0, 0] = np.inf
    write_volume(folder / "imagesTr" / "case_001_0000.nii.gz", img)
    w1: list[str] = []
    w2: list[str] = []
    sequential = verify_dataset(folder, warnings=w1)
    parallel = verify_dataset(folder, warnings=w2, num_workers=2)
    assert len(sequential) == 2 and sequential[0].startswith("imagesTr/case_001_0000") and len(w1) == 1
    assert parallel == sequential and w2 == w1


# ------------------------------------------------------------------------------------------------ load_dataset_json

GOOD_META = {
    "channel_names": {"0": "CT"},
    "labels": {"background": 0, "a": 1},
    "numTraining": 1,
    "file_ending": ".nii.gz",
}


def write_meta(tmp_path: Path, meta) -> Path:
    (tmp_path / "dataset.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    return tmp_path


def test_load_dataset_json_ok(tmp_path):
    assert load_dataset_json(write_meta(tmp_path, GOOD_META)) == GOOD_META


def test_load_dataset_json_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="dataset.json: file not found"):
        load_dataset_json(tmp_path)


def test_load_dataset_json_bad_json(tmp_path):
    with pytest.raises(DatasetError, match=r"not valid JSON \(Expecting"):
        load_dataset_json(write_meta(tmp_path, '{"labels": {'))


def test_load_dataset_json_not_an_object(tmp_path):
    with pytest.raises(DatasetError, match="top level must be an object, found list"):
        load_dataset_json(write_meta(tmp_path, "[1, 2]"))


def test_load_dataset_json_missing_keys_reported_together(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_dataset_json(write_meta(tmp_path, {"labels": {"background": 0}}))
    problems = info.value.problems
    assert len(problems) == 3
    for key in ("channel_names", "numTraining", "file_ending"):
        assert any(f"required key '{key}' is missing" in p for p in problems)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("numTraining", "2", "key 'numTraining' must be int, found str ('2')"),
        ("numTraining", True, "key 'numTraining' must be int, found bool (True)"),
        ("labels", [0, 1], "key 'labels' must be dict, found list ([0, 1])"),
        ("file_ending", 5, "key 'file_ending' must be str, found int (5)"),
        ("file_ending", "nii.gz", "'file_ending' must start with '.', found 'nii.gz'"),
        ("channel_names", {}, "'channel_names' is empty"),
        ("channel_names", {"1": "CT"}, "'channel_names' keys must be '0'..'0', found ['1']"),
    ],
)
def test_load_dataset_json_wrong_values(tmp_path, key, value, expected):
    with pytest.raises(DatasetError) as info:
        load_dataset_json(write_meta(tmp_path, {**GOOD_META, key: value}))
    assert len(info.value.problems) == 1
    assert expected in info.value.problems[0]


@pytest.mark.parametrize(
    "labels, expected",
    [
        ({"a": 1}, "'labels' must map 'background' to 0, found None"),
        ({"background": 1}, "'labels' must map 'background' to 0, found 1"),
        ({"background": 0, "a": 300}, "label 'a' must be an integer 0-255 or a list of them, found 300"),
        ({"background": 0, "a": []}, "label 'a' must be an integer 0-255 or a list of them, found []"),
        ({"background": 0, "a": True}, "label 'a' must be an integer 0-255 or a list of them, found True"),
        ({"background": 0, "a": "1"}, "label 'a' must be an integer 0-255 or a list of them, found '1'"),
    ],
)
def test_load_dataset_json_bad_labels(tmp_path, labels, expected):
    with pytest.raises(DatasetError) as info:
        load_dataset_json(write_meta(tmp_path, {**GOOD_META, "labels": labels}))
    assert any(expected in p for p in info.value.problems), info.value.problems


# ------------------------------------------------------------------------------------------------ reading / writing


def test_list_cases(tmp_path):
    folder = make_dataset(tmp_path, channel_names={"0": "T1", "1": "T2"})
    (folder / "labelsTr" / "case_001.nii.gz").unlink()
    cases = list_cases(folder, load_dataset_json(folder))
    assert [c.case_id for c in cases] == ["case_000", "case_001"]
    assert [p.name for p in cases[0].images] == ["case_000_0000.nii.gz", "case_000_0001.nii.gz"]
    assert cases[0].label == folder / "labelsTr" / "case_000.nii.gz"
    assert cases[1].label is None


def test_read_case_float_label_with_integer_values(tmp_path):
    img = write_volume(tmp_path / "x_0000.nii.gz", image_array())
    lab = write_volume(tmp_path / "x.nii.gz", label_array().astype(np.float32))
    assert read_image(lab)[0].dtype == np.float32
    data, seg, geo = read_case(Case("x", (img,), lab))
    assert data.shape == (1,) + SHAPE and data.dtype == np.float32
    assert seg.dtype == np.uint8
    np.testing.assert_array_equal(seg, label_array())
    assert geo == Geometry(SPACING, ORIGIN, IDENTITY, SHAPE)


def test_read_case_rejects_non_integer_float_label(tmp_path):
    img = write_volume(tmp_path / "x_0000.nii.gz", image_array())
    lab = write_volume(tmp_path / "x.nii.gz", label_array().astype(np.float32) + 0.25)
    with pytest.raises(AutosegError, match="non-integer values"):
        read_case(Case("x", (img,), lab))


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint8])
def test_geometry_round_trip_is_exact(tmp_path, ext, dtype):
    geometry = Geometry(spacing=(0.5, 0.75, 2.5), origin=(-10.5, 20.25, 3.0), direction=FLIP_PERM, shape=SHAPE)
    array = (np.arange(math.prod(SHAPE)).reshape(SHAPE) % 200).astype(dtype)
    path = tmp_path / f"vol{ext}"
    write_image(path, array, geometry)
    back, geo = read_image(path)
    assert geo == geometry
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, array)
    assert read_header(path) == geometry
    assert Geometry.from_json(json.loads(json.dumps(geo.to_json()))) == geometry
    assert sorted(os.listdir(tmp_path)) == [f"vol{ext}"]  # no temporary left behind


@pytest.mark.parametrize("ext, atol", [(".mha", 0.0), (".nrrd", 1e-12), (".nii.gz", 1e-5)])
def test_geometry_round_trip_arbitrary_rotation(tmp_path, ext, atol):
    """Documents format precision: MHA is exact, NRRD stores spacing*direction (1 ulp), NIfTI-1 stores float32."""
    c, s = math.cos(0.3), math.sin(0.3)
    geometry = Geometry((0.7, 0.8, 2.3), (-12.3, 45.6, 7.89), (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0), SHAPE)
    write_image(tmp_path / f"v{ext}", image_array(), geometry)
    geo = read_image(tmp_path / f"v{ext}")[1]
    assert geo.shape == geometry.shape
    for field in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(getattr(geo, field), getattr(geometry, field), rtol=0, atol=atol)


def test_write_image_rejects_shape_mismatch_and_leaves_no_temporary(tmp_path):
    with pytest.raises(ValueError, match="does not match geometry shape"):
        write_image(tmp_path / "v.nii.gz", np.zeros((2, 2, 2)), Geometry(SPACING, ORIGIN, IDENTITY, SHAPE))
    assert os.listdir(tmp_path) == []


def test_write_image_refuses_two_file_formats(tmp_path):
    with pytest.raises(AutosegError, match="two-file image formats"):
        write_image(tmp_path / "v.mhd", np.zeros(SHAPE), Geometry(SPACING, ORIGIN, IDENTITY, SHAPE))


# ------------------------------------------------------------------------------------------------ paths


def test_dataset_name_resolves_id_and_full_name(tmp_path):
    (tmp_path / "Dataset501_Liver").mkdir()
    (tmp_path / "Dataset001_Tiny").mkdir()
    assert dataset_name("501", tmp_path) == "Dataset501_Liver"
    assert dataset_name(" 501 ", tmp_path) == "Dataset501_Liver"
    assert dataset_name("1", tmp_path) == "Dataset001_Tiny"
    assert dataset_name("Dataset501_X", tmp_path) == "Dataset501_X"


def test_dataset_name_missing_id(tmp_path):
    (tmp_path / "Dataset501_Liver").mkdir()
    with pytest.raises(AutosegError, match=r"no dataset with id 502 under .* \(looked for Dataset502_\*\)"):
        dataset_name("502", tmp_path)
    with pytest.raises(AutosegError, match="no dataset with id 501"):
        dataset_name("501", tmp_path / "does_not_exist")


def test_dataset_name_ambiguous(tmp_path):
    (tmp_path / "Dataset503_A").mkdir()
    (tmp_path / "Dataset503_B").mkdir()
    with pytest.raises(AutosegError, match="dataset id 503 is ambiguous .*: Dataset503_A, Dataset503_B"):
        dataset_name("503", tmp_path)


@pytest.mark.parametrize("spec", ["foo", "Dataset5_X", "Dataset501", "Dataset501_a b", ""])
def test_dataset_name_bad_spec(tmp_path, spec):
    with pytest.raises(AutosegError, match="is not a dataset id"):
        dataset_name(spec, tmp_path)


def test_roots_defaults(tmp_path):
    roots = Roots.from_env(env={}, cwd=tmp_path)
    assert roots == Roots(tmp_path / "autoseg_raw", tmp_path / "autoseg_preprocessed", tmp_path / "autoseg_results")


def test_roots_env_override(tmp_path):
    env = {"AUTOSEG_RAW": "/data/raw", "AUTOSEG_RESULTS": "/data/res"}
    roots = Roots.from_env(env=env, cwd=tmp_path)
    assert roots.raw == Path("/data/raw")
    assert roots.preprocessed == tmp_path / "autoseg_preprocessed"
    assert roots.results == Path("/data/res")


def test_roots_from_process_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOSEG_PREPROCESSED", str(tmp_path / "pp"))
    monkeypatch.chdir(tmp_path)
    roots = env_roots()
    assert roots.preprocessed == tmp_path / "pp"
    assert roots.raw == tmp_path / "autoseg_raw"


# ------------------------------------------------------------------------------------------------ atomic


def test_atomic_path_cleans_up_when_writer_raises(tmp_path):
    target = tmp_path / "out" / "file.json"
    seen = []
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            seen.append(tmp)
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert seen[0].name.startswith(TMP_MARK) and seen[0].name.endswith("file.json")
    assert not seen[0].exists()
    assert not target.exists()
    assert os.listdir(target.parent) == []


def test_atomic_path_keeps_old_file_when_writer_raises(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")
    with pytest.raises(KeyError):
        with atomic_path(target) as tmp:
            tmp.write_text("new, half")
            raise KeyError("x")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["file.txt"]


def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["file.txt"]


# ------------------------------------------------------------------------------------------------ NIfTI scanning
# ITK reads NaN/Inf voxels of a NIfTI file as 0 and zero-fills a truncated one, so dataset_io scans the bytes itself.


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nifti_scan_counts_nonfinite_across_chunk_boundaries(tmp_path, dtype):
    # ~1.3-2.6 MB of incompressible floats: several unaligned decompressed chunks
    arr = np.random.default_rng(1).random((80, 64, 64)).astype(dtype)
    flat = arr.reshape(-1)
    flat[::997] = np.nan
    flat[5::1201] = np.inf
    flat[7::1703] = -np.inf
    path = write_volume(tmp_path / "big.nii.gz", arr)
    expected = (int(np.isnan(arr).sum()), int(np.isinf(arr).sum()))
    assert nifti_scan(path) == (None, expected)
    path.write_bytes(path.read_bytes()[:-5000])
    reason, _ = nifti_scan(path)
    assert reason.startswith("gzip stream ends early, after ")


def test_nifti_scan_tiny_file_and_integer_data(tmp_path):
    path = write_volume(tmp_path / "tiny.nii", np.ones((2, 2, 2), np.uint8))
    assert path.stat().st_size == 360
    assert nifti_scan(path) == (None, (0, 0))
    path.write_bytes(path.read_bytes()[:-3])
    assert nifti_scan(path) == ("holds 357 bytes, header promises 360", (0, 0))


def test_nifti_scan_ignores_non_nifti(tmp_path):
    path = tmp_path / "x.nii"
    path.write_bytes(b"\0" * 1000)
    assert nifti_scan(path) == (None, (0, 0))


def test_nan_in_mha_dataset_and_label(tmp_path):
    folder = make_dataset(tmp_path, file_ending=".mha")
    img = image_array()
    img[0, 0, :4] = np.nan
    write_volume(folder / "imagesTr" / "case_000_0000.mha", img)
    seg = label_array().astype(np.float32)
    seg[1, 1, 1] = np.inf
    write_volume(folder / "labelsTr" / "case_001.mha", seg)
    problems = verify_dataset(folder)
    assert len(problems) == 2, problems
    assert problems[0].startswith("imagesTr/case_000_0000.mha: 4 NaN voxel(s) out of 960")
    assert problems[1].startswith("labelsTr/case_001.mha: label map holds 0 NaN and 1 Inf voxel(s)")


def test_nan_in_nifti_label(ds):
    seg = label_array().astype(np.float32)
    seg[1, 1, 1] = np.nan
    write_volume(ds / "labelsTr" / "case_001.nii.gz", seg)
    assert verify_dataset(ds) == [
        "labelsTr/case_001.nii.gz: label map holds 1 NaN and 0 Inf voxel(s); label maps must hold integer class "
        "values; re-export it with an integer type"
    ]
