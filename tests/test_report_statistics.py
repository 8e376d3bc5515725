"""HU statistics per structure and per lesion (TotalSegmentator --statistics parity) in `autoseg report`."""

import math

import numpy as np
import pandas as pd
import pytest

from autoseg.evaluation.report import case_report, intensity_statistics, report_folder
from autoseg.io.images import Geometry, write_image
from autoseg.labels import DEFAULT_LABELS

GEO = Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (4, 12, 12))


def _case():
    lab = np.zeros(GEO.shape, np.uint8)
    lab[:, :6, :6] = 1  # liver, 144 voxels
    lab[1, 1:3, 1:3] = 2  # liver lesion A, 4 voxels
    lab[2, 4, 4] = 2  # liver lesion B, 1 voxel
    image = np.arange(np.prod(GEO.shape), dtype=np.int16).reshape(GEO.shape) - 300  # every voxel its own value
    return lab, image


def test_statistics_equal_numpy_over_each_structure_and_lesion():
    lab, image = _case()
    rep = case_report(lab, GEO, DEFAULT_LABELS, "c", image)
    liver = image[lab == 1].astype(float)
    assert rep["intensity_hu"]["liver"] == pytest.approx({
        "hu_mean": liver.mean(), "hu_median": np.median(liver),
        "hu_p5": np.percentile(liver, 5), "hu_p95": np.percentile(liver, 95)})
    assert rep["intensity_hu"]["liver_tumor"]["hu_mean"] == pytest.approx(image[lab == 2].mean())
    assert all(math.isnan(v) for v in rep["intensity_hu"]["kidney"].values())  # absent structure
    big, small = rep["lesions"]
    assert big["voxels"] == 4 and big["hu_mean"] == pytest.approx(image[1, 1:3, 1:3].mean())
    assert big["hu_p5"] == pytest.approx(np.percentile(image[1, 1:3, 1:3], 5))
    assert small["hu_median"] == image[2, 4, 4] == small["hu_p95"]
    assert "intensity_hu" in case_report(lab, GEO) and case_report(lab, GEO)["intensity_hu"] == {}
    assert "hu_mean" not in case_report(lab, GEO)["lesions"][0]


def test_intensity_statistics_of_nothing_is_nan():
    assert all(math.isnan(v) for v in intensity_statistics(np.array([])).values())


def test_report_files_carry_the_statistics(tmp_path):
    lab, image = _case()
    write_image(tmp_path / "pred" / "c.nii.gz", lab, GEO)
    write_image(tmp_path / "img" / "c_0000.nii.gz", image, GEO)
    report_folder(tmp_path / "pred", tmp_path / "out", DEFAULT_LABELS, image_dir=tmp_path / "img", progress=False)
    row = pd.read_csv(tmp_path / "out" / "report.csv").iloc[0]
    assert row["liver_hu_mean"] == pytest.approx(image[lab == 1].mean())
    assert row["liver_tumor_hu_p95"] == pytest.approx(np.percentile(image[lab == 2], 95))
    lesions = pd.read_csv(tmp_path / "out" / "report_lesions.csv")
    assert list(lesions["hu_mean"]) == pytest.approx([image[1, 1:3, 1:3].mean(), image[2, 4, 4]])
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<th>HU mean</th>" in page and f"{image[lab == 1].mean():.1f}" in page
