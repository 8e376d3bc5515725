"""Tests of autoseg.evaluation.report and rendering: measurements on constructed shapes with known size, and the files the command writes."""

import argparse
import base64
import doctest
import json
import math

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

import autoseg.evaluation.rendering as rendering
import autoseg.evaluation.report as rp
from autoseg.cli.evaluation import add_report_cli
from autoseg.io.images import Geometry, to_sitk, write_image
from autoseg.errors import AutosegError
from autoseg.labels import DEFAULT_LABELS

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def test_docstring_examples():
    assert doctest.testmod(rp).failed == 0


def _ellipsoid(shape, spacing_zyx, semi_zyx_mm, centre=None):
    """Voxels whose centres lie inside an axis-aligned ellipsoid (semi-axes in mm) centred on a voxel centre."""
    centre = [n // 2 for n in shape] if centre is None else centre
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    q = sum(((g - c) * s / a) ** 2 for g, c, s, a in zip((z, y, x), centre, spacing_zyx, semi_zyx_mm))
    return q <= 1.0


def _geometry(shape, spacing_zyx, origin=(0.0, 0.0, 0.0), direction=IDENTITY):
    return Geometry(tuple(float(s) for s in reversed(spacing_zyx)), origin, direction, shape)


def test_sphere_volume_and_diameter():
    """Sphere of radius 10.2 mm on 0.5 x 0.5 x 2 mm voxels: volume within 5 % of 4/3 pi r^3, maximal axial
    diameter within one pixel of 2r."""
    spacing, r = (2.0, 0.5, 0.5), 10.2
    shape = (15, 48, 48)
    lab = _ellipsoid(shape, spacing, (r, r, r)).astype(np.uint8) * 2
    (les,) = rp.lesion_measurements(lab, _geometry(shape, spacing))
    assert les["volume_ml"] == pytest.approx(4 / 3 * math.pi * r**3 / 1000, rel=0.05)
    assert abs(les["max_axial_diameter_mm"] - 2 * r) <= 0.5
    assert les["axial_slice"] == 7  # the equator
    assert les["equivalent_diameter_mm"] == pytest.approx(2 * r, rel=0.02)
    assert les["structure"] == "liver_tumor" and les["organ"] == "liver" and les["lesion"] == 1


@pytest.mark.parametrize(
    "spacing, semi, expected",
    [
        ((2.0, 0.5, 0.5), (6.0, 4.0, 8.0), 16.0),  # major in-plane semi-axis along x
        ((3.0, 0.4, 0.8), (6.0, 9.0, 5.0), 18.0),  # along y, with anisotropic in-plane pixels
    ],
)
def test_ellipsoid_diameter_is_twice_the_major_in_plane_semi_axis(spacing, semi, expected):
    shape = (9, 60, 40)
    lab = _ellipsoid(shape, spacing, semi).astype(np.uint8) * 4
    (les,) = rp.lesion_measurements(lab, _geometry(shape, spacing))
    assert abs(les["max_axial_diameter_mm"] - expected) <= max(spacing[1:])
    assert les["structure"] == "kidney_tumor" and les["organ"] == "kidney"
    # the diameter lies along the major axis: its end points differ (almost) only along that axis
    (_, y0, x0), (_, y1, x1) = les["diameter_endpoints_index"]
    along_y = abs(y1 - y0) * spacing[1] > abs(x1 - x0) * spacing[2]
    assert along_y == (semi[1] > semi[2])


def test_single_pixel_and_empty_diameters():
    m = np.zeros((3, 4, 4), bool)
    assert rp.max_axial_diameter(m, (1, 1, 1))[:2] == (0.0, -1)
    m[1, 2, 2] = True
    d, z, _ = rp.max_axial_diameter(m, (5.0, 0.7, 0.7))
    assert (d, z) == (pytest.approx(0.7), 1)


def test_diameter_is_max_over_slices_not_3d():
    """A thin rod along z is long in 3D but small in every axial slice."""
    lab = np.zeros((20, 6, 6), np.uint8)
    lab[2:18, 2:4, 2:4] = 2  # 2 x 2 pixels per slice, 16 slices
    (les,) = rp.lesion_measurements(lab, _geometry(lab.shape, (1.0, 1.0, 1.0)))
    # edge midpoints of a 2 x 2 square (rows/cols 0-1): farthest pair (-0.5, 0)-(1.5, 1) -> sqrt(2^2 + 1^2),
    # far below the rod's 16 mm length
    assert les["max_axial_diameter_mm"] == pytest.approx(math.sqrt(5))


def test_centroid_in_world_coordinates_with_rotated_flipped_direction():
    direction = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # x and y swapped (one mirrored), z flipped
    origin = (10.0, -20.0, 30.0)
    spacing_zyx = (2.0, 0.75, 0.5)
    shape = (8, 12, 14)
    lab = np.zeros(shape, np.uint8)
    lab[2:5, 4:8, 6:9] = 2  # centroid index (z, y, x) = (3, 5.5, 7)
    geo = _geometry(shape, spacing_zyx, origin, direction)
    (les,) = rp.lesion_measurements(lab, geo)
    assert les["centroid_index"] == [3.0, 5.5, 7.0]
    # by hand: spacing * (x, y, z) index = (3.5, 4.125, 6); D @ that = (-4.125, 3.5, -6); plus origin
    assert les["centroid_world_mm"] == pytest.approx([5.875, -16.5, 24.0])
    img = to_sitk(lab, geo)
    assert les["centroid_world_mm"] == pytest.approx(list(img.TransformContinuousIndexToPhysicalPoint((7.0, 5.5, 3.0))))


def test_case_report_counts_volumes_and_burden():
    spacing = (2.0, 1.0, 1.0)  # 2 mm^3 voxels
    lab = np.zeros((6, 20, 20), np.uint8)
    lab[1:5, 1:11, 1:11] = 1  # liver box: 400 voxels
    lab[2:4, 2:4, 2:4] = 2  # liver tumour A: 8 voxels
    lab[2:4, 6:9, 6:9] = 2  # liver tumour B: 18 voxels
    lab[1:5, 13:18, 13:18] = 3  # kidney: 100 voxels
    lab[3, 15, 15] = 4  # kidney tumour: 1 voxel
    rep = rp.case_report(lab, _geometry(lab.shape, spacing), case_id="c7")
    assert rep["case"] == "c7"
    assert rep["volumes_ml"] == pytest.approx({"liver": 374 * 0.002, "liver_tumor": 26 * 0.002,
                                              "kidney": 99 * 0.002, "kidney_tumor": 0.002})
    assert rep["tumour_count"] == {"liver": 2, "kidney": 1}
    assert rep["liver_tumour_burden"] == pytest.approx(26 / 400)
    assert rep["tumour_burden"]["kidney"] == pytest.approx(1 / 100)
    liver_lesions = [les for les in rep["lesions"] if les["structure"] == "liver_tumor"]
    assert [les["voxels"] for les in liver_lesions] == [18, 8]  # ranked largest first
    assert [les["lesion"] for les in liver_lesions] == [1, 2]


def test_case_report_without_tumours_and_custom_labels():
    lab = np.zeros((3, 5, 5), np.uint8)
    rep = rp.case_report(lab, _geometry(lab.shape, (1, 1, 1)))
    assert rep["tumour_count"] == {"liver": 0, "kidney": 0} and rep["lesions"] == []
    assert math.isnan(rep["liver_tumour_burden"])
    lab[1, 1:3, 1:3] = 5
    rep = rp.case_report(lab, _geometry(lab.shape, (1, 1, 1)), {"background": 0, "lesion": 5})
    assert rep["tumour_count"] == {"lesion": 1} and rep["volumes_ml"] == {"lesion": pytest.approx(0.004)}


# ----------------------------------------------------------------------------------------------------------------
# Files


def _case(shift: int) -> np.ndarray:
    lab = np.zeros((8, 24, 24), np.uint8)
    lab[1:7, 2:14, 2:14] = 1
    lab[3:5, 4 + shift : 7 + shift, 4:7] = 2
    lab[2:6, 15:21, 15:21] = 3
    if shift:
        lab[3, 17:19, 17:19] = 4
    return lab


@pytest.fixture()
def cases(tmp_path):
    pred, images = tmp_path / "pred", tmp_path / "images"
    geo = Geometry((0.8, 0.8, 2.5), (5.0, -3.0, 7.0), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0), (8, 24, 24))
    for i, c in enumerate(("a1", "b2")):
        lab = _case(i * 3)
        write_image(pred / f"{c}.nii.gz", lab, geo)
        ct = np.where(lab > 0, 60, -100).astype(np.int16)
        write_image(images / f"{c}_0000.nii.gz", ct, geo)
    return pred, images


def _parser():
    p = argparse.ArgumentParser()
    add_report_cli(p.add_subparsers(dest="command"))
    return p


def _labels_file(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"labels": DEFAULT_LABELS, "file_ending": ".nii.gz"}))
    return path


def test_report_cli_writes_csv_json_html_png(cases, tmp_path, capsys):
    pred, images = cases
    out = tmp_path / "out"
    args = _parser().parse_args(["report", "-i", str(pred), "-images", str(images), "-o", str(out),
                                 "--labels", str(_labels_file(tmp_path)), "-np", "1"])
    assert args.images == str(images)
    assert args.func(args) == 0
    assert "2 case(s)" in capsys.readouterr().out

    table = pd.read_csv(out / "report.csv")
    assert list(table["case"]) == ["a1", "b2"]
    assert list(table["n_kidney_tumours"]) == [0, 1]
    assert table.loc[0, "liver_tumor_ml"] == pytest.approx(18 * 0.8 * 0.8 * 2.5 / 1000)
    assert table.loc[1, "liver_tumour_burden"] == pytest.approx(18 / (6 * 12 * 12))
    lesions = pd.read_csv(out / "report_lesions.csv")
    assert len(lesions) == 3 and set(lesions["structure"]) == {"liver_tumor", "kidney_tumor"}

    def no_nan(token):
        raise AssertionError(f"report.json holds {token}")

    data = json.loads((out / "report.json").read_text(), parse_constant=no_nan)
    assert [c["case"] for c in data["cases"]] == ["a1", "b2"]
    assert data["cases"][0]["lesions"][0]["centroid_world_mm"] == pytest.approx(
        list(to_sitk(_case(0), Geometry((0.8, 0.8, 2.5), (5.0, -3.0, 7.0), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0),
                                        (8, 24, 24))).TransformContinuousIndexToPhysicalPoint((5.0, 5.0, 3.5))))

    page = (out / "report.html").read_text()
    for c in ("a1", "b2"):
        png = out / "overlays" / f"{c}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # the page is self-contained: each overlay is embedded as a data URI holding the PNG's bytes
        assert f"src='data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}'" in page
    assert "overlays/" not in page and str(tmp_path) not in page
    assert not any(p.name.startswith(".tmp-") for p in out.rglob("*"))


def test_report_without_images_over_blank(cases, tmp_path):
    pred, _ = cases
    reports = rp.report_folder(pred, tmp_path / "out", DEFAULT_LABELS, progress=False)
    assert len(reports) == 2 and (tmp_path / "out" / "overlays" / "b2.png").is_file()


def test_report_missing_images_named_together(cases, tmp_path):
    pred, images = cases
    for p in images.iterdir():
        p.unlink()
    with pytest.raises(AutosegError, match=r"2 case\(s\) have no image .*a1, b2"):
        rp.report_folder(pred, tmp_path / "out", DEFAULT_LABELS, image_dir=images, progress=False)


def test_report_image_on_another_grid_is_an_error(cases, tmp_path):
    pred, images = cases
    write_image(images / "b2_0000.nii.gz", np.zeros((8, 24, 24), np.int16),
                Geometry((1.0, 1.0, 2.5), (0.0, 0.0, 0.0), IDENTITY, (8, 24, 24)))
    with pytest.raises(AutosegError, match=r"b2\.nii\.gz: spacing .* image .*b2_0000"):
        rp.report_folder(pred, tmp_path / "out", DEFAULT_LABELS, image_dir=images, progress=False)


def test_display_follows_radiological_convention():
    flipped = Geometry((1, 1, 1), (0, 0, 0), (-1, 0, 0, 0, -1, 0, 0, 0, 1), (2, 2, 2))
    assert rendering._display_flips(flipped) == (True, True)
    assert rendering._display_flips(Geometry((1, 1, 1), (0, 0, 0), IDENTITY, (2, 2, 2))) == (False, False)


def test_report_cli_flags_have_help():
    sub = _parser()._subparsers._group_actions[0].choices["report"]
    for action in sub._actions:
        if action.dest != "help":
            assert action.help, action.dest


def test_sitk_reference_for_world_coordinates_is_itk_convention():
    """Sanity of the independent reference used above: ITK maps index (i, j, k) = (x, y, z) order."""
    img = sitk.Image(4, 5, 6, sitk.sitkUInt8)
    img.SetSpacing((2.0, 3.0, 4.0))
    assert img.TransformContinuousIndexToPhysicalPoint((1.0, 1.0, 1.0)) == (2.0, 3.0, 4.0)
