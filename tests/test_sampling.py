"""Lesion-aware sampling: fixed class shares, components drawn uniformly whatever their size."""

import numpy as np
import pytest

from autoseg.atomic import write_json, write_npy, write_npz
from autoseg.preprocessing.preprocess import MIN_PER_COMPONENT, foreground_locations
from autoseg.training.data import BatchLoader, load_case, sampling_index
from autoseg.training.sampling import RANDOM_SHARE, SamplingIndex, class_shares, pick_voxel

SHAPE = (24, 40, 40)


def organ_with_lesions(big=True, small_at=((3, 3, 3),)):
    """Organ (label 1) block with one large lesion (label 2, 6x10x10) and 2x2x2 small lesions at ``small_at``."""
    seg = np.zeros(SHAPE, np.uint8)
    seg[2:22, 2:38, 2:38] = 1
    if big:
        seg[8:14, 20:30, 20:30] = 2
    for z, y, x in small_at:
        seg[z:z + 2, y:y + 2, x:x + 2] = 2
    return seg


def write_case(folder, case_id, seg):
    """A preprocessed case whose image holds each voxel's flat index + 1, so a patch tells where it came from."""
    write_npy(folder / f"{case_id}.npy", (np.arange(np.prod(SHAPE), dtype=np.float32) + 1).reshape((1, *SHAPE)))
    write_npy(folder / f"{case_id}_seg.npy", seg)
    write_npz(folder / f"{case_id}_fg.npz", foreground_locations(seg, case_id))
    write_json(folder / f"{case_id}.json", {"case": case_id, "has_label": True})


def test_class_shares_weight_tumours_and_sum_to_the_foreground_share():
    shares = class_shares([1, 2, 3, 4], tumour=[2, 4])
    assert shares == pytest.approx({1: 1 / 9, 2: 2 / 9, 3: 1 / 9, 4: 2 / 9})
    assert sum(shares.values()) == pytest.approx(1 - RANDOM_SHARE)
    assert class_shares([1, 3], tumour=[2, 4]) == pytest.approx({1: 1 / 3, 3: 1 / 3})
    assert class_shares([], tumour=[2]) == {}


def test_foreground_locations_keep_every_component():
    seg = organ_with_lesions(small_at=((3, 3, 3), (18, 5, 33)))
    seg[0, 0, 0] = 2  # a one-voxel lesion
    fg = foreground_locations(seg, "c", max_per_class=200)
    coords, comps = fg["class_2"], fg["component_2"]
    assert coords.dtype == np.uint16 and comps.dtype == np.uint32 and len(coords) == len(comps)
    assert np.all(seg[tuple(coords.T.astype(int))] == 2)
    sizes = np.bincount(comps)[1:]
    assert len(sizes) == 4 and sorted(sizes) == [1, 8, 8, MIN_PER_COMPONENT]  # the 600-voxel lesion is sampled down
    for c in np.unique(comps):  # each component id is one connected blob
        pts = coords[comps == c].astype(int)
        assert (pts.max(0) - pts.min(0)).max() <= 9


def test_draws_follow_class_shares_and_components_uniformly(tmp_path):
    # case A: organ, one large lesion and one 8-voxel lesion; case B: organ and one 8-voxel lesion only
    write_case(tmp_path, "a", organ_with_lesions())
    write_case(tmp_path, "b", organ_with_lesions(big=False, small_at=((15, 30, 5),)))
    index = sampling_index(tmp_path, ["a", "b"], tumour_values=[2])
    assert index.shares == pytest.approx({1: 2 / 9, 2: 4 / 9})
    rng = np.random.default_rng(0)
    n = 30_000
    draws = [index.draw(rng) for _ in range(n)]
    labels = np.array([-1 if d[1] is None else d[1] for d in draws])
    assert np.mean(labels == -1) == pytest.approx(RANDOM_SHARE, abs=0.015)
    assert np.mean(labels == 2) == pytest.approx(4 / 9, abs=0.015)
    lesions = [(case, comp) for case, label, comp in draws if label == 2]
    counts = {k: lesions.count(k) / len(lesions) for k in set(lesions)}
    assert len(counts) == 3  # three lesions in all, each drawn a third of the time whatever its size
    assert all(v == pytest.approx(1 / 3, abs=0.02) for v in counts.values())


def test_small_lesion_is_in_as_many_patches_as_the_large_one(tmp_path):
    seg = organ_with_lesions()
    write_case(tmp_path, "a", seg)
    small = np.zeros(SHAPE, bool)
    small[3:5, 3:5, 3:5] = True
    big = (seg == 2) & ~small
    loader = BatchLoader(tmp_path, ["a"], {"patch_size": [8, 8, 8], "batch_size": 4}, [[1, 1, 1]], augment=False,
                         num_workers=0, sampling=sampling_index(tmp_path, ["a"], [2]))
    small_ids, big_ids = np.flatnonzero(small) + 1, np.flatnonzero(big) + 1
    hits = {"small": 0, "big": 0}
    case = load_case(tmp_path, "a")
    for _ in range(150):
        for patch in next(loader)["data"][:, 0].numpy():
            hits["small"] += bool(np.isin(small_ids, patch).any())
            hits["big"] += bool(np.isin(big_ids, patch).any())
    loader.close()
    assert case.components[2].max() == 2
    # voxel-proportional sampling would centre on the small lesion 8 times in 608
    assert hits["small"] > 0.6 * hits["big"] > 0


def test_pick_voxel_and_index_validation(tmp_path):
    coords = np.array([[0, 0, 0], [1, 1, 1], [5, 5, 5]], np.uint16)
    comps = np.array([1, 1, 2], np.uint32)
    rng = np.random.default_rng(0)
    assert {tuple(pick_voxel(coords, comps, 1, rng)) for _ in range(50)} == {(0, 0, 0), (1, 1, 1)}
    assert tuple(pick_voxel(coords, comps, 2, rng)) == (5, 5, 5)
    empty = SamplingIndex.build(["x"], [{}], [2])
    assert empty.shares == {} and all(empty.draw(rng) == (0, None, None) for _ in range(5))
    write_case(tmp_path, "a", organ_with_lesions())
    with pytest.raises(ValueError, match="other cases"):
        BatchLoader(tmp_path, ["a"], {"patch_size": [8, 8, 8], "batch_size": 2}, [[1, 1, 1]], num_workers=0,
                    sampling=SamplingIndex.build(["b"], [{}], []))


def test_cascade_stage2_random_patches_stay_inside_the_organ_rois(tmp_path):
    seg = np.zeros(SHAPE, np.uint8)
    seg[4:10, 5:15, 5:15] = 1  # one organ in a corner of the image
    write_case(tmp_path, "a", seg)
    config = {"patch_size": [4, 4, 4], "batch_size": 2, "spacing": [2.0, 1.0, 1.0], "previous_stage": "3d_lowres",
              "roi_margin_mm": 2.0}
    index = sampling_index(tmp_path, ["a"], [], config)
    assert index.rois == (((slice(3, 11), slice(3, 17), slice(3, 17)),),)  # 2 mm: 1 voxel in z, 2 in-plane
    rng = np.random.default_rng(0)
    centres = np.array([index.random_centre(0, rng) for _ in range(2000)])
    assert centres.min(0).tolist() == [3, 3, 3] and centres.max(0).tolist() == [10, 16, 16]
    plain = sampling_index(tmp_path, ["a"], [], {**config, "previous_stage": None})
    assert plain.rois is None and plain.random_centre(0, rng) is None
    # through the loader: no patch (random or centred) lies wholly outside the ROI
    loader = BatchLoader(tmp_path, ["a"], config, [[1, 1, 1]], augment=False, num_workers=0, sampling=index)
    ids = (np.arange(np.prod(SHAPE)) + 1).reshape(SHAPE)
    roi_ids = ids[3:11, 3:17, 3:17].ravel()
    for _ in range(100):
        for patch in next(loader)["data"][:, 0].numpy():
            assert np.isin(patch[patch > 0], roi_ids).any()
    loader.close()
