"""predict --uncertainty: entropy and mutual information on known probabilities, the members of the sliding window,
maps on the input's grid, the calibration of the review flag, and flagging a case its folds disagree on."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from autoseg.io.images import read_image, write_image
from autoseg.inference.predictor import Predictor, predict_folder, sliding_window
from autoseg.inference.uncertainty import (
    assigned_probability, calibrate_review, entropy, expected_dice, label_probability, lesion_confidence,
    member_statistics, mutual_information, review_decision,
)
from autoseg.jsonfile import read_json
from autoseg.evaluation.report import report_folder

from test_predictor import DIRECTION, RULES, sphere_image


# ----------------------------------------------------------------------------------------- the maths, known values


def test_entropy_known_values_softmax_and_regions():
    p = np.array([[1.0, 0.5, 1 / 3, 0.9], [0.0, 0.5, 1 / 3, 0.1], [0.0, 0.0, 1 / 3, 0.0]])
    h = entropy(p, regions=False)
    expected_last = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(3)
    np.testing.assert_allclose(h, [0.0, math.log(2) / math.log(3), 1.0, expected_last], atol=1e-7)
    # regions: binary entropy per channel, averaged over channels
    r = np.array([[0.5, 1.0, 0.0], [0.5, 0.5, 0.0]])
    np.testing.assert_allclose(entropy(r, regions=True), [1.0, 0.5, 0.0], atol=1e-7)
    # torch tensors give the same numbers
    np.testing.assert_allclose(entropy(torch.tensor(p), regions=False).numpy(), h, atol=1e-7)


def _members(probs_per_member):
    """(members, C, N) probabilities -> mixture and mean member entropy, as the sliding window sums them."""
    p = np.asarray(probs_per_member, dtype=np.float64)
    logits = np.log(np.clip(p, 1e-300, None))
    stats = member_statistics(logits, regions=False, axis=1).mean(0)
    return stats[:-1], stats[-1]


def test_mutual_information_known_values_and_zero_where_members_agree():
    agree = [[[0.7, 0.2], [0.3, 0.8]]] * 3  # three members, two classes, two voxels: identical
    mixture, mean_h = _members(agree)
    np.testing.assert_allclose(mixture, agree[0], atol=1e-12)
    np.testing.assert_allclose(mutual_information(mixture, mean_h, regions=False), 0.0, atol=1e-7)
    # two members each sure of the other class: the mixture is a tie (entropy 1), members are certain (0): MI 1
    mixture, mean_h = _members([[[1.0], [0.0]], [[0.0], [1.0]]])
    assert float(mutual_information(mixture, mean_h, regions=False)[0]) == pytest.approx(1.0, abs=1e-7)
    # members (0.9, 0.1) and (0.5, 0.5): H(mixture) - mean H, by hand (bits, since C = 2)
    mixture, mean_h = _members([[[0.9], [0.1]], [[0.5], [0.5]]])

    def hb(q):
        return -(q * math.log2(q) + (1 - q) * math.log2(1 - q))

    assert float(mutual_information(mixture, mean_h, regions=False)[0]) == pytest.approx(
        hb(0.7) - (hb(0.9) + 1.0) / 2, abs=1e-7)


def test_label_probability_and_expected_dice():
    probs = np.array([[0.1, 0.5, 1.0, 1.0], [0.9, 0.5, 0.0, 0.0]], np.float32)
    seg = np.array([1, 1, 0, 0])
    assert expected_dice(probs, seg, [1])["1"] == pytest.approx(2 * 1.4 / (2 + 1.4))
    # nothing predicted: 1 - the most likely voxel's probability, 1 when the probabilities are 0 too
    assert expected_dice(probs, np.zeros(4, int), [1])["1"] == pytest.approx(0.1)
    assert expected_dice(np.array([[1.0, 1.0], [0.0, 0.0]]), np.zeros(2, int), [1])["1"] == 1.0
    np.testing.assert_allclose(assigned_probability(probs, seg, None), [0.9, 0.5, 1.0, 1.0])
    # regions (kidney = [1, 2] painted first, tumour 2 inside): P(label 1) = p(kidney) * (1 - p(tumour))
    regions = np.array([[0.8, 0.9], [0.25, 0.9]], np.float32)
    np.testing.assert_allclose(label_probability(regions, [1, 2], 1), [0.6, 0.09], atol=1e-6)
    np.testing.assert_allclose(label_probability(regions, [1, 2], 2), [0.25, 0.9], atol=1e-6)
    np.testing.assert_allclose(assigned_probability(regions, np.array([0, 2]), [1, 2]), [0.15, 0.9], atol=1e-6)


def test_lesion_confidence_in_unit_interval():
    c = lesion_confidence(np.array([1.0, 1.0]), np.array([0.0, 0.0]), np.array([0.0, 0.0]))
    assert c["confidence"] == 1.0 and c["mean_mutual_information"] == 0.0
    c = lesion_confidence(np.array([0.5, 0.6]), np.array([1.0, 0.9]))
    assert 0.0 <= c["confidence"] <= 0.06 and c["mean_mutual_information"] is None


# ------------------------------------------------------------------------------------------------- calibration


def test_calibration_picks_the_expected_threshold():
    est = [{"1": q, "2": 0.9} for q in (0.90, 0.95, 0.50, 0.60, 0.85, 0.40)]
    true = [{"1": d, "2": 0.95} for d in (0.90, 0.95, 0.40, 0.65, 0.80, 0.30)]
    review = calibrate_review(est, true, {"1": "liver", "2": "kidney"})
    liver = review["structures"]["1"]
    # three low cases (0.40, 0.50, 0.60); ceil(0.9 * 3) = 3 must be caught: just above 0.60, halfway to 0.85
    assert liver["expected_dice_below"] == pytest.approx(0.725)
    assert liver["low_dice_cases"] == 3 and liver["cv_sensitivity"] == 1.0 and liver["cv_specificity"] == 1.0
    # no low case: the lowest estimate seen, so no validation case is flagged
    kidney = review["structures"]["2"]
    assert kidney["expected_dice_below"] == 0.9 and kidney["cv_sensitivity"] is None
    assert kidney["cv_specificity"] == 1.0
    # a lower target sensitivity needs only 2 of the 3: just above 0.50, halfway to 0.60
    half = calibrate_review(est, true, {"1": "liver"}, target_sensitivity=0.6)
    assert half["structures"]["1"]["expected_dice_below"] == pytest.approx(0.55)
    assert review_decision({"1": 0.7, "2": 0.95}, review)[0] is True
    assert review_decision({"1": 0.73, "2": 0.95}, review)[0] is False
    flag, reasons = review_decision({"1": 0.7}, None)
    assert flag is None and "find_best_configuration" in reasons[0]


def test_calibration_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="one per case"):
        calibrate_review([{"1": 0.5}], [], {})


# ---------------------------------------------------------------------------------- members in the sliding window


class Scaled(nn.Module):
    """Stand-in network: logits (-k x, k x); class 1 where the input is positive when k > 0."""

    num_outputs = 2
    deep_supervision = False

    def __init__(self, k: float, bias: float = 0.0):
        super().__init__()
        self.k, self.bias = k, bias

    def forward(self, x):
        return torch.cat([-self.k * x, self.k * x + self.bias], 1)


class Asymmetric(nn.Module):
    """Not flip-equivariant (a ramp along x), so its mirrorings disagree."""

    num_outputs = 2
    deep_supervision = False

    def forward(self, x):
        ramp = torch.linspace(-3, 3, x.shape[-1]).expand_as(x)
        return torch.cat([-ramp, ramp], 1)


def test_member_statistics_leave_the_logits_unchanged():
    data = torch.randn(1, 12, 20, 18)
    for net in (Scaled(3.0), Asymmetric()):
        plain = sliding_window(net, data, (8, 16, 16), 2, mirror_axes=(0, 1, 2))
        both = sliding_window(net, data, (8, 16, 16), 2, mirror_axes=(0, 1, 2), members=True)
        assert both.shape == (2 + 3, 12, 20, 18)
        assert torch.equal(both[:2], plain)  # --uncertainty does not change the mask
        np.testing.assert_allclose(both[2:4].sum(0).numpy(), 1.0, atol=1e-5)  # the mixture is a distribution
    # a flip-equivariant network: every mirroring agrees, so MI = 0; the ramp's mirrorings disagree
    equi = sliding_window(Scaled(3.0), data, (8, 16, 16), 2, mirror_axes=(0, 1, 2), members=True)
    assert float(mutual_information(equi[2:4], equi[4], regions=False).max()) < 1e-5
    asym = sliding_window(Asymmetric(), data, (8, 16, 16), 2, mirror_axes=(2,), members=True)
    mi = mutual_information(asym[2:4], asym[4], regions=False)
    assert float(mi.min()) >= 0.0 and float(mi[..., 0].mean()) > 0.3  # the ends of the ramp: opposite votes


# ----------------------------------------------------------------------------------------- predict --uncertainty


def predictor(models, spacing=(2.0, 1.2, 1.2), mirror=False):
    plans = {
        "normalization": [{"channel": 0, "scheme": "ct", "clip": [-1000.0, 1000.0], "mean": 0.0, "std": 100.0}],
        "configurations": {"3d_fullres": {"dims": 3, "patch_size": [16, 16, 16], "spacing": list(spacing),
                                          "resampling": RULES}},
    }
    meta = {"labels": {"background": 0, "liver": 1, "liver_tumor": 2}, "channel_names": {"0": "CT"},
            "numTraining": 1, "file_ending": ".nii.gz"}
    return Predictor(plans, meta, "3d_fullres", models, torch.device("cpu"), mirror)


class ThreeClass(nn.Module):
    """Stand-in with three outputs: class 2 (tumour) where the input is positive, background elsewhere; ``doubt``
    raises class 0 inside too, so two such folds can disagree."""

    num_outputs = 3
    deep_supervision = False

    def __init__(self, doubt: float = 0.0):
        super().__init__()
        self.doubt = doubt

    def forward(self, x):
        return torch.cat([-4 * x + self.doubt * (x > 0), -8 + 0 * x, 4 * x], 1)


REVIEW = {"dice_below": 0.7, "target_sensitivity": 0.9, "cases": 10,
          "structures": {"2": {"name": "liver_tumor", "expected_dice_below": 0.8}}}


def test_uncertainty_maps_on_the_input_grid_and_disagreeing_folds_flagged(tmp_path):
    image, ref, geo = sphere_image()
    src = tmp_path / "in"
    write_image(src / "case_0000.nii.gz", image, geo)
    geo = read_image(src / "case_0000.nii.gz")[1]  # as stored (NIfTI keeps float32 spacing)
    confident = predictor([ThreeClass(), ThreeClass()])
    disagree = predictor([ThreeClass(), ThreeClass(doubt=10.0)])  # the second fold calls the sphere background
    for name, p in (("confident", confident), ("disagree", disagree)):
        out = tmp_path / name
        assert predict_folder([p], src, out, uncertainty=True, review=REVIEW) == []
        seg, seg_geo = read_image(out / "case.nii.gz")
        folder = out / "uncertainty"
        assert sorted(f.name for f in folder.iterdir()) == [
            "case.json", "case_entropy.nii.gz", "case_mutual_information.nii.gz", "case_probability.nii.gz"]
        for f in folder.glob("*.nii.gz"):
            arr, map_geo = read_image(f)
            assert map_geo == geo == seg_geo and arr.shape == ref.shape and arr.dtype == np.float32
            assert arr.min() >= 0.0 and arr.max() <= 1.0
        summary = read_json(folder / "case.json", "", "uncertainty")
        assert summary["members"] == 2 and summary["structures"] == {"1": "liver", "2": "liver_tumor"}
        if name == "confident":
            assert summary["flag_for_review"] is False
            assert summary["expected_dice"]["2"] > 0.9
            assert read_image(folder / "case_mutual_information.nii.gz")[0].max() < 1e-3
            assert len(summary["lesions"]) == 1 and summary["lesions"][0]["confidence"] > 0.7
        else:
            assert summary["flag_for_review"] is True
            assert "liver_tumor: expected Dice" in summary["reasons"][0]
            assert summary["expected_dice"]["2"] < 0.8
            mi = read_image(folder / "case_mutual_information.nii.gz")[0]
            assert mi[ref > 0].mean() > 0.3 and mi[ref == 0].mean() < 0.05  # they disagree inside the sphere only
            assert summary["lesions"] and summary["lesions"][0]["confidence"] < 0.4
    # the mask is the same with and without --uncertainty
    plain = tmp_path / "plain"
    predict_folder([confident], src, plain)
    assert np.array_equal(read_image(plain / "case.nii.gz")[0], read_image(tmp_path / "confident" / "case.nii.gz")[0])
    assert not (plain / "uncertainty").exists()

    # the report: the flagged case first, lesion confidences, the entropy row under the overlay
    both = tmp_path / "both"
    both.mkdir()
    for name in ("confident", "disagree"):
        (both / f"{name}.nii.gz").write_bytes((tmp_path / name / "case.nii.gz").read_bytes())
        (both / "uncertainty").mkdir(exist_ok=True)
        for f in (tmp_path / name / "uncertainty").iterdir():
            target = both / "uncertainty" / f.name.replace("case", name)
            if f.suffix == ".json":
                data = json.loads(f.read_text())
                data["case"] = name
                target.write_text(json.dumps(data))
            else:
                target.write_bytes(f.read_bytes())
    labels = {"background": 0, "liver": 1, "liver_tumor": 2}
    reports = report_folder(both, tmp_path / "report", labels, progress=False)
    assert {r["case"]: r["review"]["flag_for_review"] for r in reports} == {"confident": False, "disagree": True}
    assert all("confidence" in les for r in reports for les in r["lesions"])
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Flagged for review: 1 of 2" in html
    assert html.index("id='disagree'") < html.index("id='confident'")
    assert "<th>confidence</th>" in html
    lesions_csv = (tmp_path / "report" / "report_lesions.csv").read_text().splitlines()[0]
    assert "confidence" in lesions_csv
    assert "flag_for_review" in (tmp_path / "report" / "report.csv").read_text().splitlines()[0]


def test_one_member_writes_no_mutual_information(tmp_path):
    image, _, geo = sphere_image()
    src = tmp_path / "in"
    write_image(src / "case_0000.nii.gz", image, geo)
    assert predict_folder([predictor([ThreeClass()])], src, tmp_path / "out", uncertainty=True) == []
    folder = tmp_path / "out" / "uncertainty"
    assert not (folder / "case_mutual_information.nii.gz").exists()
    summary = read_json(folder / "case.json", "", "uncertainty")
    assert summary["members"] == 1 and summary["flag_for_review"] is None
    assert summary["mean_foreground_mutual_information"] is None


def test_cascade_rois_carry_the_mutual_information_channel():
    from autoseg.inference.predictor import predict_preprocessed

    data = np.where(np.arange(20)[:, None, None] < 10, 1.0, -1.0) * np.ones((1, 20, 24, 24), np.float32)
    config = {"patch_size": [8, 16, 16]}
    models = [ThreeClass(), ThreeClass(doubt=10.0)]
    box = (slice(0, 12), slice(0, 16), slice(0, 16))
    out = predict_preprocessed(models, data, config, False, torch.device("cpu"), mirror=False, rois=[box],
                               uncertainty=True)
    assert out.shape == (4, 20, 24, 24)
    plain = predict_preprocessed(models, data, config, False, torch.device("cpu"), mirror=False, rois=[box])
    np.testing.assert_array_equal(out[:3], plain)
    outside = np.ones(data.shape[1:], bool)
    outside[box] = False
    assert out[3][outside].max() == 0.0 and np.all(out[0][outside] == 1.0)  # background, no disagreement
    assert out[3][box][:10].mean() > 0.3  # the folds disagree where the input is positive (z < 10)
