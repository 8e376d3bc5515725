"""Tests of autoseg.evaluation (metrics, lesions, evaluate): metric values on constructed arrays with hand-computed expectations."""

import argparse
import doctest
import json
import math

import numpy as np
import pandas as pd
import pytest

import autoseg.evaluation.evaluate as ev
import autoseg.evaluation.lesions as ev_lesions
import autoseg.evaluation.metrics as ev_metrics
import autoseg.labels as label_module
import autoseg.masks as masks
from autoseg.cli.evaluation import add_evaluate_cli
from autoseg.io.images import Geometry, write_image
from autoseg.errors import AutosegError
from autoseg.labels import default_regions, tumour_label_values

ABDOMEN = {"background": 0, "liver": 1, "liver_tumor": 2, "kidney": 3, "kidney_tumor": 4}


def test_docstring_examples():
    for module in (ev, ev_lesions, ev_metrics, label_module, masks):
        assert doctest.testmod(module).failed == 0


# ----------------------------------------------------------------------------------------------------------------
# Overlap


def test_overlap_metrics_from_known_counts():
    ref = np.zeros((3, 4, 5), bool)
    pred = np.zeros_like(ref)
    ref.flat[:10] = True  # 10 reference voxels
    pred.flat[4:12] = True  # 8 predicted voxels, 6 of them (4..9) in the reference
    m = ev_metrics.binary_metrics(pred, ref, (2.0, 1.0, 1.0))
    assert (m["tp_voxels"], m["fp_voxels"], m["fn_voxels"]) == (6, 2, 4)
    assert m["dice"] == pytest.approx(12 / 18)
    assert m["iou"] == pytest.approx(6 / 12)
    assert m["sensitivity"] == pytest.approx(6 / 10)
    assert m["precision"] == pytest.approx(6 / 8)
    assert m["volume_ref_ml"] == pytest.approx(10 * 2 / 1000)  # 2 mm^3 voxels
    assert m["volume_pred_ml"] == pytest.approx(8 * 2 / 1000)
    assert m["relative_volume_error"] == pytest.approx(-0.2)


def test_identical_masks_are_perfect():
    ref = np.zeros((5, 6, 7), bool)
    ref[1:4, 2:5, 1:6] = True
    m = ev_metrics.binary_metrics(ref, ref.copy(), (3.0, 1.0, 1.0))
    assert m["dice"] == m["iou"] == m["surface_dice"] == 1.0
    assert m["hd95_mm"] == m["assd_mm"] == m["hd_mm"] == 0.0


def test_zero_one_integer_masks_accepted_other_values_refused():
    ref = np.zeros((2, 3, 3), np.uint8)
    ref[0, 1, 1] = 1
    assert ev_metrics.binary_metrics(ref, ref, (1, 1, 1))["dice"] == 1.0
    with pytest.raises(ValueError, match="0 and 1"):
        ev_metrics.binary_metrics(ref * 2, ref, (1, 1, 1))
    with pytest.raises(ValueError, match="shape"):
        ev_metrics.binary_metrics(ref[:1], ref, (1, 1, 1))
    with pytest.raises(ValueError, match="2 value"):
        ev_metrics.binary_metrics(ref, ref, (1, 1))
    with pytest.raises(ValueError, match="> 0"):
        ev_metrics.binary_metrics(ref, ref, (1, 0, 1))
    with pytest.raises(ValueError, match="tolerance"):
        ev_metrics.binary_metrics(ref, ref, (1, 1, 1), tolerance_mm=-1)


# ----------------------------------------------------------------------------------------------------------------
# Surface distances


@pytest.mark.parametrize("k", [1, 2, 3])
def test_parallel_planes_offset_along_z_anisotropic(k):
    """Two full axial planes k slices apart with 3 mm slices: every surface distance is exactly 3k mm."""
    ref = np.zeros((10, 6, 7), bool)
    pred = np.zeros_like(ref)
    ref[2] = True
    pred[2 + k] = True
    m = ev_metrics.binary_metrics(pred, ref, (3.0, 1.0, 1.0), tolerance_mm=3 * k - 0.5)
    assert m["hd95_mm"] == pytest.approx(3 * k)
    assert m["hd_mm"] == pytest.approx(3 * k)
    assert m["assd_mm"] == pytest.approx(3 * k)
    assert m["surface_dice"] == 0.0  # tolerance just below the shift
    assert ev_metrics.binary_metrics(pred, ref, (3.0, 1.0, 1.0), tolerance_mm=3 * k)["surface_dice"] == 1.0  # at the shift


def test_single_voxel_shift_along_x_is_one_mm():
    """Sagittal planes one column apart: 1 mm whatever the (3 mm) slice spacing."""
    ref = np.zeros((5, 6, 8), bool)
    pred = np.zeros_like(ref)
    ref[:, :, 3] = True
    pred[:, :, 4] = True
    m = ev_metrics.binary_metrics(pred, ref, (3.0, 1.0, 1.0), tolerance_mm=0.5)
    assert (m["hd95_mm"], m["assd_mm"], m["hd_mm"]) == (1.0, 1.0, 1.0)
    assert m["surface_dice"] == 0.0
    assert ev_metrics.binary_metrics(pred, ref, (3.0, 1.0, 1.0), tolerance_mm=1.0)["surface_dice"] == 1.0


def test_shift_along_y_uses_y_spacing():
    ref = np.zeros((4, 9, 5), bool)
    pred = np.zeros_like(ref)
    ref[:, 2, :] = True
    pred[:, 4, :] = True
    m = ev_metrics.binary_metrics(pred, ref, (3.0, 0.7, 1.0))
    assert m["hd95_mm"] == pytest.approx(1.4)
    assert m["assd_mm"] == pytest.approx(1.4)


def test_distances_are_to_the_other_surface_not_its_interior():
    """A 3^3 cube centred in a 7^3 cube: the small cube's 26 surface voxels all lie 2 voxels from the big cube's
    surface (0 if measured to its interior); the big cube's corner is sqrt(3 * 2^2) from the small cube."""
    ref = np.zeros((9, 9, 9), bool)
    ref[1:8, 1:8, 1:8] = True
    pred = np.zeros_like(ref)
    pred[3:6, 3:6, 3:6] = True
    d_pred, d_ref = ev_metrics._surface_distances(pred, ref, (1.0, 1.0, 1.0))
    assert d_pred.size == 26 and np.all(d_pred == 2.0)
    assert d_ref.size == 7**3 - 5**3
    m = ev_metrics.binary_metrics(pred, ref, (1.0, 1.0, 1.0))
    assert m["hd_mm"] == pytest.approx(math.sqrt(12))
    assert m["dice"] == pytest.approx(2 * 27 / (27 + 343))


def _brute_force_surface_distances(a, b, spacing):
    """Reference implementation: 6-neighbour surfaces by explicit shifts, all-pairs distances."""

    def surface(m):
        p = np.pad(m, 1)
        interior = np.ones_like(m)
        for ax in range(3):
            for step in (-1, 1):
                interior &= np.roll(p, step, axis=ax)[1:-1, 1:-1, 1:-1]
        return m & ~interior

    pa = np.argwhere(surface(a)) * np.asarray(spacing)
    pb = np.argwhere(surface(b)) * np.asarray(spacing)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return d.min(axis=1), d.min(axis=0)


@pytest.mark.parametrize("method", ["edt", "kdtree"])
def test_distance_metrics_match_brute_force_definition(method, monkeypatch):
    if method == "kdtree":  # force the k-d tree path that large organ boxes take
        monkeypatch.setattr(ev_metrics, "EDT_MAX_VOXELS", 0)
        monkeypatch.setattr(ev_metrics, "KDTREE_SPARSITY", 0)
    rng = np.random.default_rng(0)
    ref = np.zeros((8, 10, 12), bool)
    ref[2:6, 2:8, 3:10] = True
    pred = np.zeros_like(ref)
    pred[1:5, 3:9, 2:8] = True
    pred[6, 8, 10] = True  # a stray voxel makes the two directed distance sets differ
    ref[rng.random(ref.shape) < 0.05] = True
    spacing = (2.5, 0.8, 0.6)
    d_pred, d_ref = _brute_force_surface_distances(pred, ref, spacing)
    both = np.concatenate([d_pred, d_ref])
    m = ev_metrics.binary_metrics(pred, ref, spacing, tolerance_mm=1.0)
    assert m["hd95_mm"] == pytest.approx(np.percentile(both, 95))  # union of both sets (MedPy hd95)
    assert m["hd95_mm"] <= max(np.percentile(d_pred, 95), np.percentile(d_ref, 95))
    assert m["hd_mm"] == pytest.approx(both.max())
    assert m["assd_mm"] == pytest.approx(both.mean())
    assert m["surface_dice"] == pytest.approx(np.mean(both <= 1.0 + 1e-6))  # 0.6^2 + 0.8^2 rounds either way
    got_pred, got_ref = ev_metrics._surface_distances(pred, ref, spacing, method)
    np.testing.assert_allclose(np.sort(got_pred), np.sort(d_pred))
    np.testing.assert_allclose(np.sort(got_ref), np.sort(d_ref))


def test_mask_on_array_border_has_surface_there():
    ref = np.ones((3, 3, 3), bool)  # the whole array: every voxel but the centre is surface
    pred = np.zeros_like(ref)
    pred[1, 1, 1] = True
    m = ev_metrics.binary_metrics(pred, ref, (1.0, 1.0, 1.0))
    assert m["hd_mm"] == pytest.approx(math.sqrt(3))  # ref corner to the centre voxel
    assert m["hd95_mm"] > 0


# ----------------------------------------------------------------------------------------------------------------
# Empty masks


def test_both_empty_is_perfect_agreement():
    z = np.zeros((4, 4, 4), bool)
    m = ev_metrics.binary_metrics(z, z, (1.0, 1.0, 1.0))
    for k in ("dice", "iou", "sensitivity", "precision", "surface_dice"):
        assert m[k] == 1.0
    for k in ("hd95_mm", "hd_mm", "assd_mm", "volume_pred_ml", "volume_ref_ml", "relative_volume_error"):
        assert m[k] == 0.0


@pytest.mark.parametrize("empty", ["pred", "ref"])
def test_one_empty_gives_zero_overlap_and_nan_distances(empty):
    full = np.zeros((4, 4, 4), bool)
    full[1:3, 1:3, 1:3] = True
    z = np.zeros_like(full)
    pred, ref = (z, full) if empty == "pred" else (full, z)
    m = ev_metrics.binary_metrics(pred, ref, (1.0, 1.0, 1.0))
    for k in ("dice", "iou", "sensitivity", "precision", "surface_dice"):
        assert m[k] == 0.0
    for k in ("hd95_mm", "hd_mm", "assd_mm"):
        assert math.isnan(m[k])
    if empty == "pred":
        assert m["relative_volume_error"] == -1.0
    else:
        assert math.isnan(m["relative_volume_error"])


# ----------------------------------------------------------------------------------------------------------------
# Lesions


def test_split_lesion_detected_at_iou_and_halves_matched():
    ref = np.zeros((6, 6, 12), bool)
    ref[1:5, 1:5, 1:9] = True  # 4 x 4 x 8 = 128 voxels
    pred = np.zeros_like(ref)
    pred[1:5, 1:5, 1:4] = True  # 48
    pred[1:5, 1:5, 5:9] = True  # 64; column 4 is missed
    d = ev_lesions.lesion_detection(pred, ref, (1.0, 1.0, 1.0))
    (r,) = d["reference"]
    assert r["n_overlapping"] == 2
    assert r["iou"] == pytest.approx(112 / 128)
    assert r["detected_iou"] and r["detected_any"]
    assert [p["matched_iou"] for p in d["predicted"]] == [True, True]
    assert d["false_positives"] == 0


def test_merged_lesions_detected_by_overlap_only():
    ref = np.zeros((5, 5, 12), bool)
    ref[1:4, 1:4, 0:3] = True  # 27 voxels
    ref[1:4, 1:4, 6:9] = True  # 27 voxels
    pred = np.zeros_like(ref)
    pred[1:4, 1:4, 0:9] = True  # 81 voxels bridging both
    d = ev_lesions.lesion_detection(pred, ref, (1.0, 1.0, 1.0))
    assert len(d["reference"]) == 2 and len(d["predicted"]) == 1
    for r in d["reference"]:
        assert r["iou"] == pytest.approx(27 / 81)
        assert not r["detected_iou"] and r["detected_any"]
    p = d["predicted"][0]
    assert p["matched_any"] and not p["matched_iou"] and not p["false_positive"]
    assert d["false_positives"] == 0


def test_missed_lesion_false_positive_and_partial_overlap():
    ref = np.zeros((4, 10, 20), bool)
    ref[1:3, 1:3, 1:3] = True  # lesion 1: missed
    ref[1:3, 5:9, 5:10] = True  # lesion 2: 40 voxels, 16 of them predicted
    pred = np.zeros_like(ref)
    pred[1:3, 5:9, 5:7] = True  # 16 voxels inside lesion 2: IoU 0.4
    pred[1:3, 1:3, 15:18] = True  # far from everything: false positive
    d = ev_lesions.lesion_detection(pred, ref, (1.0, 1.0, 1.0))
    missed, partial = d["reference"]
    assert (missed["detected_iou"], missed["detected_any"], missed["n_overlapping"]) == (False, False, 0)
    assert partial["iou"] == pytest.approx(16 / 40)
    assert (partial["detected_iou"], partial["detected_any"]) == (False, True)
    assert d["false_positives"] == 1
    assert sorted(p["false_positive"] for p in d["predicted"]) == [False, True]


def test_lesions_are_26_connected():
    ref = np.zeros((3, 3, 3), bool)
    ref[0, 0, 0] = ref[1, 1, 1] = ref[2, 2, 2] = True  # corner-touching voxels: one lesion
    d = ev_lesions.lesion_detection(np.zeros_like(ref), ref, (1.0, 1.0, 1.0))
    assert len(d["reference"]) == 1 and d["reference"][0]["voxels"] == 3


def test_size_bins_from_equivalent_diameters():
    """5 mm voxels (125 mm^3): 1 voxel -> d = 6.20 mm, 2^3 -> 12.41, 3^3 -> 18.61, 4^3 -> 24.81."""
    ref = np.zeros((5, 5, 24), bool)
    ref[0, 0, 0] = True
    ref[0:2, 0:2, 3:5] = True
    ref[0:3, 0:3, 8:11] = True
    ref[0:4, 0:4, 14:18] = True
    d = ev_lesions.lesion_detection(np.zeros_like(ref), ref, (5.0, 5.0, 5.0))
    diam = sorted((r["diameter_mm"], r["size_bin"], r["volume_ml"]) for r in d["reference"])
    assert [round(x[0], 2) for x in diam] == [6.20, 12.41, 18.61, 24.81]
    assert [x[1] for x in diam] == ["<10mm", "10-20mm", "10-20mm", ">20mm"]
    assert [x[2] for x in diam] == pytest.approx([0.125, 1.0, 3.375, 8.0])
    assert ev_lesions.size_bin(10.0) == "10-20mm" and ev_lesions.size_bin(20.0) == "10-20mm" and ev_lesions.size_bin(20.001) == ">20mm"


def test_detection_stats_by_bin():
    ref = [
        {"size_bin": "<10mm", "detected_iou": False, "detected_any": True},
        {"size_bin": "10-20mm", "detected_iou": True, "detected_any": True},
        {"size_bin": ">20mm", "detected_iou": False, "detected_any": False},
    ]
    pred = [
        {"size_bin": "10-20mm", "matched_iou": True, "matched_any": True},
        {"size_bin": "<10mm", "matched_iou": False, "matched_any": True},
        {"size_bin": "<10mm", "matched_iou": False, "matched_any": False},
    ]
    s = ev_lesions.detection_stats(ref, pred)
    a = s["iou"]["all"]
    assert (a["recall"], a["precision"]) == (pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert a["f1"] == pytest.approx(1 / 3)
    assert s["any"]["all"]["recall"] == pytest.approx(2 / 3) and s["any"]["all"]["precision"] == pytest.approx(2 / 3)
    assert s["iou"][">=10mm"]["recall"] == 0.5 and s["iou"][">=10mm"]["n_reference"] == 2
    assert s["iou"]["<10mm"]["precision"] == 0.0 and s["iou"]["<10mm"]["f1"] == 0.0
    assert math.isnan(s["iou"][">20mm"]["precision"]) and s["iou"][">20mm"]["f1"] == 0.0
    empty = ev_lesions.detection_stats([], [])["iou"]["all"]
    assert math.isnan(empty["recall"]) and math.isnan(empty["precision"]) and math.isnan(empty["f1"])


# ----------------------------------------------------------------------------------------------------------------
# Cases, labels and regions


def test_default_regions_and_tumour_labels():
    assert default_regions(ABDOMEN) == {"liver_region": [1, 2], "kidney_region": [3, 4]}
    assert tumour_label_values(ABDOMEN) == [2, 4]
    assert default_regions({"background": 0, "Kidney": 1, "Kidney tumour": 2}) == {"Kidney_region": [1, 2]}


def test_kits_region_rule_kidney_includes_tumour():
    ref = np.zeros((4, 6, 6), np.uint8)
    ref[1:3, 1:4, 1:4] = 3  # 18 voxels kidney...
    ref[1, 2, 2] = 4  # ...one of them tumour: 17 kidney, 1 tumour
    pred = np.where(ref > 0, 3, 0).astype(np.uint8)  # the tumour is called kidney
    r = ev.evaluate_case(pred, ref, (2.0, 1.0, 1.0), ABDOMEN)
    s = r["structures"]
    assert s["kidney_region"]["kind"] == "region" and s["kidney_region"]["values"] == [3, 4]
    assert s["kidney_region"]["dice"] == 1.0
    assert s["kidney"]["dice"] == pytest.approx(2 * 17 / (18 + 17))
    assert s["kidney_tumor"]["dice"] == 0.0 and math.isnan(s["kidney_tumor"]["hd95_mm"])
    assert s["liver"]["dice"] == 1.0 and s["liver_region"]["dice"] == 1.0  # both empty
    assert r["lesions"]["kidney_tumor"]["reference"][0]["detected_any"] is False
    assert r["lesions"]["kidney_tumor"]["reference"][0]["centroid_index"] == [1.0, 2.0, 2.0]


def test_region_based_labels_and_explicit_regions():
    labels = {"background": 0, "kidney": [1, 2], "tumor": 2}
    ref = np.zeros((3, 4, 4), np.uint8)
    ref[1, 1:3, 1:3] = 1
    ref[1, 1, 1] = 2
    pred = (ref > 0).astype(np.uint8)  # everything predicted as 1
    r = ev.evaluate_case(pred, ref, (1, 1, 1), labels)
    assert set(r["structures"]) == {"kidney", "tumor"}
    assert r["structures"]["kidney"]["kind"] == "region" and r["structures"]["kidney"]["dice"] == 1.0
    assert r["structures"]["tumor"]["dice"] == 0.0
    assert set(r["lesions"]) == {"tumor"}
    r = ev.evaluate_case(pred, ref, (1, 1, 1), {"background": 0, "a": 1, "b": 2}, regions={"ab": [1, 2]},
                         tumour_labels=[])
    assert r["structures"]["ab"]["dice"] == 1.0 and r["lesions"] == {}
    with pytest.raises(ValueError, match="already a label"):
        ev.evaluate_case(pred, ref, (1, 1, 1), {"background": 0, "a": 1}, regions={"a": [1, 2]})


def test_evaluate_case_crop_matches_full_array_metrics():
    """Per-label cropping must not change any metric."""
    rng = np.random.default_rng(1)
    ref = np.zeros((12, 20, 20), np.uint8)
    ref[2:9, 3:15, 4:16] = 1
    ref[4:6, 5:9, 6:9] = 2
    pred = ref.copy()
    pred[rng.random(ref.shape) < 0.03] = 2
    pred[0, 0, 0] = 1  # a stray liver voxel at the array corner
    spacing = (2.5, 0.7, 0.7)
    r = ev.evaluate_case(pred, ref, spacing, ABDOMEN, tolerance_mm=1.5)
    for name, value in (("liver", [1]), ("liver_tumor", [2]), ("liver_region", [1, 2])):
        full = ev_metrics.binary_metrics(np.isin(pred, value), np.isin(ref, value), spacing, 1.5)
        got = {k: v for k, v in r["structures"][name].items() if k not in ("kind", "values")}
        assert got == pytest.approx(full, nan_ok=True)


def test_evaluate_case_validates_inputs():
    a = np.zeros((2, 2, 2), np.uint8)
    with pytest.raises(ValueError, match="shape"):
        ev.evaluate_case(a, a[:1], (1, 1, 1), ABDOMEN)
    with pytest.raises(ValueError, match="integer label"):
        ev.evaluate_case(a + 0.5, a, (1, 1, 1), ABDOMEN)
    with pytest.raises(ValueError, match="label 'liver'"):
        ev.evaluate_case(a, a, (1, 1, 1), {"liver": "one"})


# ----------------------------------------------------------------------------------------------------------------
# Folders and command line

SPACING_XYZ = (1.0, 1.0, 2.0)  # voxels of 2 mm^3


def _ref_case() -> np.ndarray:
    lab = np.zeros((6, 12, 12), np.uint8)
    lab[1:5, 1:7, 1:7] = 1  # liver region: 144 voxels
    lab[2:4, 2:4, 2:4] = 2  # liver tumour: 8 voxels (liver label 136)
    lab[1:5, 8:11, 8:11] = 3  # kidney region: 36 voxels
    lab[2, 9, 9] = 4  # kidney tumour: 1 voxel
    return lab


def _write(path, lab, spacing=SPACING_XYZ):
    write_image(path, lab, Geometry(spacing, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), lab.shape))


@pytest.fixture()
def folders(tmp_path):
    """Three reference cases; predictions: c1 perfect, c2 misses the liver tumour and adds a kidney-tumour false
    positive, c3 absent (tests add it)."""
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    for c in ("c1", "c2", "c3"):
        _write(ref_dir / f"{c}.nii.gz", _ref_case())
    _write(pred_dir / "c1.nii.gz", _ref_case())
    c2 = _ref_case()
    c2[c2 == 2] = 1
    c2[4, 1, 10] = 4
    _write(pred_dir / "c2.nii.gz", c2)
    return ref_dir, pred_dir


def test_missing_prediction_is_named(folders):
    ref_dir, pred_dir = folders
    with pytest.raises(AutosegError, match=r"1 of 3 case\(s\) have no prediction.*: c3"):
        ev.evaluate_folders(ref_dir, pred_dir, ABDOMEN, progress=False)


def test_all_problems_reported_together_naming_both_files(folders):
    ref_dir, pred_dir = folders
    _write(pred_dir / "c1.nii.gz", _ref_case(), spacing=(1.0, 1.0, 3.0))  # wrong slice spacing
    _write(pred_dir / "c2.nii.gz", _ref_case()[:5])  # wrong shape
    with pytest.raises(AutosegError) as info:
        ev.evaluate_folders(ref_dir, pred_dir, ABDOMEN, progress=False)
    text = str(info.value)
    assert "3 problem(s)" in text and ": c3" in text
    assert f"{pred_dir / 'c1.nii.gz'}: spacing" in text and str(ref_dir / "c1.nii.gz") in text
    assert f"{pred_dir / 'c2.nii.gz'}: shape (5, 12, 12)" in text and str(ref_dir / "c2.nii.gz") in text


def test_evaluate_folders_summary(folders):
    ref_dir, pred_dir = folders
    _write(pred_dir / "c3.nii.gz", _ref_case())
    per_case, summary, lesions = ev.evaluate_folders(ref_dir, pred_dir, ABDOMEN, progress=False, return_lesions=True)
    assert len(per_case) == 3 * 6  # 4 labels + 2 regions
    assert summary["cases"] == ["c1", "c2", "c3"] and summary["n_cases"] == 3
    liver = summary["structures"]["liver"]
    assert liver["dice_mean"] == pytest.approx((1 + 272 / 280 + 1) / 3)
    assert liver["dice_median"] == 1.0
    assert liver["dice_global"] == pytest.approx(2 * 408 / (416 + 408))
    tumour = summary["structures"]["liver_tumor"]
    assert tumour["dice_mean"] == pytest.approx(2 / 3)
    assert tumour["dice_global"] == pytest.approx(2 * 16 / (16 + 24))
    assert tumour["hd95_mm_mean"] == 0.0 and tumour["hd95_mm_n_undefined"] == 1
    assert summary["structures"]["liver_region"]["dice_global"] == 1.0

    det = summary["lesion_detection"]
    lt, kt = det["liver_tumor"], det["kidney_tumor"]
    assert lt["iou"]["all"]["recall"] == pytest.approx(2 / 3) and lt["iou"]["all"]["precision"] == 1.0
    assert lt["iou"]["<10mm"]["n_reference"] == 3  # 16 mm^3 -> 3.1 mm
    assert math.isnan(lt["iou"][">=10mm"]["recall"])
    assert kt["false_positives"] == 1 and kt["false_positives_per_case"] == pytest.approx(1 / 3)
    assert kt["any"]["all"]["precision"] == pytest.approx(3 / 4) and kt["any"]["all"]["recall"] == 1.0
    assert len(lesions[(lesions.structure == "kidney_tumor") & (lesions.source == "predicted")]) == 4


def test_evaluate_folders_reads_spacing_in_array_order(tmp_path):
    """NIfTI spacing is (x, y, z); a one-slice shift with 2.5 mm slices must read as 2.5 mm, not 0.5 mm."""
    ref = np.zeros((6, 5, 5), np.uint8)
    ref[2] = 1
    pred = np.zeros_like(ref)
    pred[3] = 1
    _write(tmp_path / "ref" / "x.nii.gz", ref, spacing=(0.5, 0.5, 2.5))
    _write(tmp_path / "pred" / "x.nii.gz", pred, spacing=(0.5, 0.5, 2.5))
    per_case, summary = ev.evaluate_folders(tmp_path / "ref", tmp_path / "pred", {"background": 0, "liver": 1},
                                            tolerance_mm=2.4, progress=False)
    row = per_case[per_case.structure == "liver"].iloc[0]
    assert row["hd95_mm"] == pytest.approx(2.5) and row["assd_mm"] == pytest.approx(2.5)
    assert row["surface_dice"] == 0.0
    assert row["volume_ref_ml"] == pytest.approx(25 * 0.625 / 1000)


def _parser():
    p = argparse.ArgumentParser()
    add_evaluate_cli(p.add_subparsers(dest="command"))
    return p


def test_cli_writes_csv_json_and_table(folders, tmp_path, capsys):
    ref_dir, pred_dir = folders
    _write(pred_dir / "c3.nii.gz", _ref_case())
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"labels": ABDOMEN, "file_ending": ".nii.gz"}))
    out = tmp_path / "out"
    args = _parser().parse_args(["evaluate", "-ref", str(ref_dir), "-pred", str(pred_dir), "--labels", str(labels),
                                 "-o", str(out), "--tolerance-mm", "2", "-np", "2"])
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "liver_region" in table and "kidney_tumor" in table and "FP/case" in table

    frame = pd.read_csv(out / "evaluation.csv")
    assert len(frame) == 18 and {"case", "structure", "dice", "hd95_mm", "surface_dice"} <= set(frame.columns)
    assert frame.loc[(frame.case == "c2") & (frame.structure == "liver"), "dice"].item() == pytest.approx(272 / 280)
    les = pd.read_csv(out / "lesions.csv")
    assert les.false_positive.fillna(False).astype(bool).sum() == 1

    def no_nan(token):
        raise AssertionError(f"summary.json holds {token}")

    summary = json.loads((out / "summary.json").read_text(), parse_constant=no_nan)
    assert summary["tolerance_mm"] == 2.0
    assert summary["structures"]["liver_tumor"]["hd95_mm_n_undefined"] == 1
    assert summary["lesion_detection"]["liver_tumor"]["iou"][">=10mm"]["recall"] is None
    assert not any(p.name.startswith(".tmp-") for p in out.iterdir())


def test_cli_dataset_flag_and_default_output(folders, roots):
    ref_dir, pred_dir = folders
    _write(pred_dir / "c3.nii.gz", _ref_case())
    ds = roots["AUTOSEG_RAW"] / "Dataset777_Eval"
    ds.mkdir(parents=True)
    (ds / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "CT"}, "labels": ABDOMEN, "numTraining": 3, "file_ending": ".nii.gz"}))
    args = _parser().parse_args(["evaluate", "-ref", str(ref_dir), "-pred", str(pred_dir), "-d", "777", "-np", "1"])
    assert args.func(args) == 0
    assert (pred_dir / "evaluation.csv").is_file() and (pred_dir / "summary.json").is_file()


def test_cli_needs_label_definitions(folders):
    ref_dir, pred_dir = folders
    args = _parser().parse_args(["evaluate", "-ref", str(ref_dir), "-pred", str(pred_dir)])
    with pytest.raises(AutosegError, match="-d DATASET or --labels"):
        args.func(args)


def test_cli_flags_have_help():
    sub = _parser()._subparsers._group_actions[0].choices["evaluate"]
    for action in sub._actions:
        if action.dest != "help":
            assert action.help, action.dest
