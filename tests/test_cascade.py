"""The organ-ROI cascade: ROI boxes (margin in mm, min size, clipping, merging), mapping stage 1 to stage 2's grid,
prediction only inside the ROI, and restoration on the exact input grid."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from autoseg.atomic import write_json
from autoseg.checkpoint import save_checkpoint
from autoseg.errors import AutosegError
from autoseg.inference.cascade import (
    map_to_grid, merge_boxes, predict_in_rois, roi_boxes, roi_fraction, stage2_boxes,
)
from autoseg.inference.predictor import Predictor
from autoseg.cli import main
from autoseg.io.images import Geometry, read_image
from autoseg.labels import LabelSpec, labels_from_probabilities
from autoseg.network import build_network
from autoseg.planning.planner import plan
from autoseg.precision import Precision
from autoseg.training.validation import validate_fold

ROOT = Path(__file__).resolve().parents[1]


def extent(box):
    return [(s.start, s.stop) for s in box]


def test_margin_is_in_mm_on_anisotropic_spacing():
    mask = np.zeros((40, 60, 60), bool)
    mask[20:22, 30:33, 30:34] = True
    (box,) = roi_boxes(mask, spacing=(5.0, 1.0, 2.0), margin_mm=10.0, min_size=(1, 1, 1))
    # 10 mm is 2 slices at 5 mm, 10 voxels at 1 mm, 5 voxels at 2 mm
    assert extent(box) == [(18, 24), (20, 43), (25, 39)]


def test_margin_rounds_up_to_whole_voxels():
    mask = np.zeros((20, 20, 20), bool)
    mask[10, 10, 10] = True
    (box,) = roi_boxes(mask, spacing=(3.0, 3.0, 2.5), margin_mm=4.0, min_size=(1, 1, 1))
    assert extent(box) == [(8, 13), (8, 13), (8, 13)]


def test_boxes_clip_to_image():
    mask = np.zeros((10, 12, 14), bool)
    mask[0, 0, 0] = mask[9, 11, 13] = True
    boxes = roi_boxes(mask, (1.0, 1.0, 1.0), 2.0, (1, 1, 1))
    assert [extent(b) for b in boxes] == [[(0, 3), (0, 3), (0, 3)], [(7, 10), (9, 12), (11, 14)]]


def test_min_size_widens_about_the_centre_and_stays_inside():
    mask = np.zeros((30, 30, 30), bool)
    mask[14:16, 1:3, 27:29] = True
    (box,) = roi_boxes(mask, (1.0, 1.0, 1.0), 0.0, (8, 10, 12))
    assert extent(box) == [(11, 19), (0, 10), (18, 30)]
    # larger than the image: the whole axis
    (box,) = roi_boxes(mask, (1.0, 1.0, 1.0), 0.0, (64, 10, 12))
    assert extent(box)[0] == (0, 30)


def test_separate_components_give_separate_boxes_and_overlapping_ones_merge():
    mask = np.zeros((20, 40, 40), bool)
    mask[5:10, 2:8, 2:8] = True
    mask[5:10, 30:36, 30:36] = True
    assert len(roi_boxes(mask, (1.0, 1.0, 1.0), 2.0, (1, 1, 1))) == 2
    merged = roi_boxes(mask, (1.0, 1.0, 1.0), 12.0, (1, 1, 1))
    assert [extent(b) for b in merged] == [[(0, 20), (0, 40), (0, 40)]]


def test_merge_boxes_repeats_until_disjoint():
    a = (slice(0, 4), slice(0, 4))
    b = (slice(10, 14), slice(0, 4))
    c = (slice(3, 11), slice(2, 3))  # bridges a and b
    d = (slice(20, 22), slice(20, 22))
    out = merge_boxes([a, b, d, c])
    assert [extent(x) for x in out] == [[(0, 14), (0, 4)], [(20, 22), (20, 22)]]
    assert merge_boxes([]) == []


def test_empty_mask_gives_no_box_and_bad_arguments_are_refused():
    assert roi_boxes(np.zeros((5, 5, 5)), (1, 1, 1), 5, (2, 2, 2)) == []
    with pytest.raises(ValueError, match="dims"):
        roi_boxes(np.zeros((5, 5, 5)), (1, 1), 5, (2, 2, 2))
    with pytest.raises(ValueError, match="margin_mm"):
        roi_boxes(np.zeros((5, 5, 5)), (1, 1, 1), -1, (2, 2, 2))


def test_roi_fraction():
    boxes = [(slice(0, 5), slice(0, 10)), (slice(5, 10), slice(0, 2))]
    assert roi_fraction(boxes, (10, 10)) == pytest.approx(0.6)
    assert roi_fraction([], (10, 10)) == 0.0


def test_map_to_grid_nearest_keeps_labels_and_extent():
    low = np.zeros((10, 12, 12), np.uint8)
    low[2:5, 3:9, 6:12] = 2
    up = map_to_grid(low, (20, 24, 36))
    assert up.shape == (20, 24, 36) and up.dtype == np.uint8 and set(np.unique(up)) == {0, 2}
    assert np.array_equal(up, low.repeat(2, 0).repeat(2, 1).repeat(3, 2))
    assert np.array_equal(map_to_grid(low, low.shape), low)


@pytest.mark.parametrize("background_channel", [True, False])
def test_stage2_never_predicts_outside_the_roi(background_channel):
    data = np.random.default_rng(0).normal(size=(1, 16, 20, 24)).astype(np.float32)
    boxes = [(slice(2, 6), slice(3, 9), slice(0, 5)), (slice(10, 16), slice(12, 20), slice(15, 24))]
    seen = []

    def tumour_everywhere(x):
        seen.append(x.shape)
        out = np.zeros((3,) + x.shape[1:], np.float32)
        out[2] = 1.0
        return out

    probs = predict_in_rois(tumour_everywhere, data, boxes, 3, background_channel)
    inside = np.zeros(data.shape[1:], bool)
    for b in boxes:
        inside[b] = True
    assert seen == [(1, 4, 6, 5), (1, 6, 8, 9)]
    assert (probs[2][inside] == 1).all() and (probs[2][~inside] == 0).all()
    assert (probs[0][~inside] == (1.0 if background_channel else 0.0)).all()


def test_predict_in_rois_checks_the_shape_it_gets_back():
    with pytest.raises(ValueError, match="stage-2 prediction"):
        predict_in_rois(lambda x: np.zeros((2, 1, 1, 1)), np.zeros((1, 4, 4, 4)), [(slice(0, 2),) * 3], 2, True)


# ------------------------------------------------------------------------------------------ predictor wiring

RULES = {"image_order": 3, "label_order": 1, "out_of_plane_order": 0, "anisotropy_threshold": 3.0}
NORM = [{"channel": 0, "scheme": "ct", "clip": [-1000.0, 1000.0], "mean": 10.0, "std": 2.0}]
SOFTMAX_META = {"labels": {"background": 0, "organ": 1, "tumour": 2}, "channel_names": {"0": "CT"}, "numTraining": 1,
                "file_ending": ".nii.gz"}
REGION_META = {"labels": {"background": 0, "organ": [1, 2], "tumour": 2}, "regions_class_order": [1, 2],
               "channel_names": {"0": "CT"}, "numTraining": 1, "file_ending": ".nii.gz"}
PATCH = [8, 8, 8]
MARGIN_MM = 3.0


class Organs(nn.Module):
    """Stage-1 stand-in: the organ channel wherever the (normalised) input is positive, never tumour."""

    deep_supervision = False

    def __init__(self, num_outputs):
        super().__init__()
        self.num_outputs = num_outputs

    def forward(self, x):
        if self.num_outputs == 2:  # regions: organ region where positive, tumour region nowhere
            return torch.cat([10 * x, torch.full_like(x, -100.0)], 1)
        return torch.cat([-10 * x, 10 * x, torch.full_like(x, -100.0)], 1)


class TumourEverywhere(Organs):
    """Stage-2 stand-in that calls every voxel it sees tumour."""

    def forward(self, x):
        big = torch.full_like(x, 100.0)
        return torch.cat([big, big], 1) if self.num_outputs == 2 else torch.cat([-big, -big, big], 1)


def cascade_predictor(meta, mirror=False, n_models=1):
    n_out = 2 if "regions_class_order" in meta else 3
    plans = {"normalization": NORM, "configurations": {
        "3d_lowres": {"dims": 3, "patch_size": PATCH, "spacing": [5.0, 1.8, 1.8], "resampling": RULES},
        "3d_cascade": {"dims": 3, "patch_size": PATCH, "spacing": [2.5, 0.9, 0.9], "resampling": RULES,
                       "previous_stage": "3d_lowres", "roi_margin_mm": MARGIN_MM, "data_identifier": "3d_fullres"},
    }}
    cpu = torch.device("cpu")
    stage1 = Predictor(plans, meta, "3d_lowres", [Organs(n_out) for _ in range(n_models)], cpu, mirror)
    return Predictor(plans, meta, "3d_cascade", [TumourEverywhere(n_out) for _ in range(n_models)], cpu, mirror,
                     stage1=stage1)


def organ_image(shape=(20, 40, 44)):
    """A sphere of organ in a volume whose first 4 x-columns are zero (cropped away by preprocessing)."""
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    r = np.sqrt(((z - 6) * 2.5) ** 2 + ((y - 12) * 0.9) ** 2 + ((x - 14) * 0.9) ** 2)
    image = np.where(r < 7, 100.0, -100.0).astype(np.float32)
    image[:, :, :4] = 0.0
    geo = Geometry((0.9, 0.9, 2.5), (-120.5, 33.25, 7.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), shape)
    return image, (r < 7), geo


@pytest.mark.parametrize("meta", [SOFTMAX_META, REGION_META], ids=["softmax", "regions"])
@pytest.mark.parametrize("mirror,n_models", [(False, 1), (True, 2)])
def test_cascade_predicts_only_inside_the_roi_on_the_exact_input_grid(meta, mirror, n_models):
    image, organ, geo = organ_image()
    pred = cascade_predictor(meta, mirror, n_models)
    probs = pred.predict_array(image[None], geo)
    assert probs.shape[1:] == image.shape  # the input grid, uncropped
    seg = labels_from_probabilities(probs, pred.regions_class_order)
    # the boxes the predictor used: stage 1 on its grid, mapped to stage 2's preprocessed (= cropped input) grid
    pre, props = pred.preprocess(image[None], geo)
    assert props["crop_box"][2] == [4, 44] and pre.shape[1:] == (20, 40, 40)  # no resampling at stage 2
    boxes = stage2_boxes(pred.stage1.labels_preprocessed(pred.stage1.preprocess(image[None], geo)[0]),
                         pre.shape[1:], pred.config)
    assert boxes and roi_fraction(boxes, pre.shape[1:]) < 0.5
    inside = np.zeros(image.shape, bool)
    for b in boxes:
        inside[b[0], b[1], slice(b[2].start + 4, b[2].stop + 4)] = True  # undo the crop
    assert np.array_equal(seg == 2, inside)  # tumour everywhere stage 2 looked, nowhere else
    assert (seg[~inside] == 0).all()
    assert inside[organ].all()  # the ROI holds the whole organ


def test_cascade_with_empty_stage1_is_all_background(capsys):
    image, _, geo = organ_image()
    probs = cascade_predictor(SOFTMAX_META).predict_array(np.full_like(image, -100.0)[None], geo)
    assert (probs.argmax(0) == 0).all()
    assert "stage 1 found no foreground; the case is all background" in capsys.readouterr().out


def test_cascade_predictor_needs_its_stage1():
    pred = cascade_predictor(SOFTMAX_META)
    with pytest.raises(AutosegError, match="previous_stage needs a stage-1 predictor"):
        Predictor(pred.plans, pred.meta, "3d_cascade", pred.models, pred.device)


def _trained(results, configuration, plans, meta, folds=("0",), dataset="Dataset501_X"):
    folder = results / dataset / configuration
    write_json(folder / "plans.json", plans)
    write_json(folder / "dataset.json", meta)
    n_out = LabelSpec.from_meta(meta).layout()[0]
    for f in folds:
        save_checkpoint(folder / f"fold_{f}", "final", build_network(plans["configurations"][configuration], 1, n_out))
    return folder


@pytest.fixture()
def small_plans():
    fp = json.loads((ROOT / "fingerprints" / "demo_phantom.json").read_text())
    p = plan(fp, device="cpu")
    for c in ("3d_lowres", "3d_cascade"):  # small networks and patches keep the test fast
        p["configurations"][c]["patch_size"] = [16, 16, 16]
    return p


def test_missing_stage1_names_folder_and_command(tmp_path, small_plans):
    folder = _trained(tmp_path, "3d_cascade", small_plans, SOFTMAX_META, folds=("0", "1"))
    _trained(tmp_path, "3d_lowres", small_plans, SOFTMAX_META, folds=("1",))
    with pytest.raises(AutosegError) as e:
        Predictor.from_trained(folder, device="cpu", precision="fp32")
    msg = str(e.value)
    assert str(tmp_path / "Dataset501_X" / "3d_lowres") in msg
    assert "autoseg train -d Dataset501_X -c 3d_lowres -f 0" in msg and "-f 1" not in msg


def test_trained_cascade_loads_stage1_with_the_same_folds(tmp_path, small_plans, capsys):
    folder = _trained(tmp_path, "3d_cascade", small_plans, SOFTMAX_META, folds=("0", "1"))
    _trained(tmp_path, "3d_lowres", small_plans, SOFTMAX_META, folds=("0", "1", "2"))
    pred = Predictor.from_trained(folder, folds=["1"], device="cpu", precision="fp32", mirror=False)
    assert pred.stage1.configuration == "3d_lowres" and len(pred.stage1.models) == 1
    assert pred.precision.mode == pred.stage1.precision.mode == "fp32"
    out = capsys.readouterr().out
    assert "3d_lowres: precision fp32" in out and "3d_cascade: precision fp32" in out
    image, _, geo = organ_image()
    probs = pred.predict_array(image[None], geo)
    assert probs.shape == (3,) + image.shape and np.isfinite(probs).all()


def test_cascade_validation_uses_stage1_of_the_same_fold(small_dataset, roots, capsys):
    assert main(["plan_and_preprocess", "-d", "501", "-np", "1", "-c", "3d_cascade", "--device", "cpu"]) == 0
    name = small_dataset.name
    pp = roots["AUTOSEG_PREPROCESSED"] / name
    assert (pp / "3d_lowres").is_dir() and (pp / "3d_fullres").is_dir()  # the cascade's first stage came along
    plans = json.loads((pp / "plans.json").read_text())
    for c in ("3d_lowres", "3d_cascade"):
        plans["configurations"][c]["patch_size"] = [16, 16, 16]
    meta = json.loads((pp / "dataset.json").read_text())
    config = plans["configurations"]["3d_cascade"]
    results = roots["AUTOSEG_RESULTS"] / name
    out = results / "3d_cascade" / "fold_3"
    model = build_network(config, 1, 5)
    case = sorted(p.name.removesuffix(".json") for p in (pp / "3d_fullres").glob("*.json"))[0]
    args = (model, pp / "3d_fullres", out, [case], config, meta, small_dataset / "labelsTr", None,
            torch.device("cpu"))
    with pytest.raises(AutosegError, match=rf"autoseg train -d {name} -c 3d_lowres -f 3"):
        validate_fold(*args, precision=Precision())
    _trained(roots["AUTOSEG_RESULTS"], "3d_lowres", plans, meta, folds=("3",), dataset=name)
    summary = validate_fold(*args, precision=Precision())
    assert list(summary["dice_per_case"]) == [case]
    assert f"{case}: 3d_cascade: " in capsys.readouterr().out
    seg, geo = read_image(out / "validation" / f"{case}.nii.gz")
    assert seg.shape == read_image(small_dataset / "labelsTr" / f"{case}.nii.gz")[0].shape


def test_cascade_leaves_an_uncropped_input_unchanged():
    image, _, geo = organ_image()
    image[:, :, :4] = -100.0  # nothing to crop: preprocessing would otherwise see the very same array
    data = image[None].copy()
    pred = cascade_predictor(SOFTMAX_META)
    first = pred.predict_array(data, geo)
    assert np.array_equal(data, image[None])
    assert np.array_equal(pred.predict_array(data, geo), first)
