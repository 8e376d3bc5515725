import numpy as np
import pytest

from autoseg.planning.fingerprint import SAMPLES_PER_CASE, case_fingerprint, nonzero_bbox, summarize
from autoseg.errors import AutosegError
from autoseg.schemas import validate

META = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2}, "file_ending": ".nii.gz"}


def constructed_case():
    """Zero border, a block of label 1 at value 10 and label 2 at value 30, air elsewhere inside the box."""
    data = np.zeros((1, 10, 12, 14), np.float32)
    data[0, 2:8, 3:9, 4:12] = -5.0
    seg = np.zeros((10, 12, 14), np.uint8)
    data[0, 3:5, 4:6, 5:7] = 10.0
    seg[3:5, 4:6, 5:7] = 1  # 8 voxels
    data[0, 6:7, 4:8, 5:9] = 30.0
    seg[6:7, 4:8, 5:9] = 2  # 16 voxels
    return data, seg


def test_nonzero_bbox():
    data, _ = constructed_case()
    assert nonzero_bbox(data) == [[2, 8], [3, 9], [4, 12]]
    assert nonzero_bbox(np.zeros((1, 3, 4, 5), np.float32)) == [[0, 3], [0, 4], [0, 5]]


def test_case_fingerprint_values():
    data, seg = constructed_case()
    fp, samples = case_fingerprint("c1", data, seg, (3.0, 0.8, 0.7))
    assert fp["shape"] == [10, 12, 14]
    assert fp["shape_after_crop"] == [6, 6, 8]
    assert fp["spacing"] == [3.0, 0.8, 0.7]
    assert fp["class_voxels"] == {"0": 10 * 12 * 14 - 24, "1": 8, "2": 16}
    s = samples[0]
    assert s.shape == (SAMPLES_PER_CASE,) and s.dtype == np.float32
    assert set(np.unique(s)) == {10.0, 30.0}  # only foreground voxels are sampled
    # 16 of 24 foreground voxels are 30: the sample mean approaches 10*8/24 + 30*16/24
    assert fp["intensity"]["0"]["mean"] == pytest.approx(10 * 8 / 24 + 30 * 16 / 24, abs=0.5)
    assert fp["intensity"]["0"]["min"] == 10.0 and fp["intensity"]["0"]["max"] == 30.0
    again, _ = case_fingerprint("c1", data, seg, (3.0, 0.8, 0.7))
    assert again == fp  # seeded by case id


def test_summarize_dataset_level():
    data, seg = constructed_case()
    a, sa = case_fingerprint("a", data, seg, (3.0, 1.0, 1.0))
    b, sb = case_fingerprint("b", data, seg, (1.0, 1.0, 1.0))
    c, sc = case_fingerprint("c", data, seg, (2.0, 0.5, 0.5))
    fp = summarize("Dataset001_T", META, [a, b, c], [sa, sb, sc])
    validate(fp, "fingerprint")
    assert fp["spacing_median"] == [2.0, 1.0, 1.0]
    assert fp["shape_after_crop_median"] == [6, 6, 8]
    assert fp["num_cases"] == 3
    total = 3 * 10 * 12 * 14
    assert fp["class_fractions"]["1"] == pytest.approx(24 / total, rel=1e-5)
    assert fp["class_fractions"]["2"] == pytest.approx(48 / total, rel=1e-5)
    assert fp["intensity"]["0"]["p99_5"] == 30.0


def test_schema_rejects_broken_fingerprint():
    data, seg = constructed_case()
    a, sa = case_fingerprint("a", data, seg, (3.0, 1.0, 1.0))
    fp = summarize("Dataset001_T", META, [a], [sa])
    fp["spacing_median"] = [1.0, -1.0, 1.0]
    del fp["cases"][0]["shape"]
    with pytest.raises(AutosegError) as e:
        validate(fp, "fingerprint", "fp.json")
    msg = str(e.value)
    assert "fp.json" in msg and "spacing_median/1" in msg and "'shape' is a required property" in msg
