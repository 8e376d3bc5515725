"""The organ-ROI cascade: ROI boxes (margin in mm, min size, clipping, merging), mapping stage 1 to stage 2's grid,
prediction only inside the ROI, and restoration on the exact input grid."""

import numpy as np
import pytest

from autoseg.inference.cascade import map_to_grid, merge_boxes, predict_in_rois, roi_boxes, roi_fraction


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
