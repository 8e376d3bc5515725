import dataclasses
import multiprocessing
import random

import numpy as np
import pytest
import torch

from autoseg.atomic import write_json, write_npy, write_npz
from autoseg.training.data import (
    AUGMENT,
    AugmentConfig,
    BatchLoader,
    build_transforms,
    downsample_labels,
    enlarged_patch_size,
    load_case,
    region_targets,
    sample_patch,
    sampling_index,
)
from autoseg.training.sampling import pick_voxel
from autoseg.errors import AutosegError
from autoseg.preprocessing.preprocess import foreground_locations

SHAPE = (20, 24, 28)
DS3 = [[1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]


def write_case(folder, case_id="case_0", shape=SHAPE):
    """A case as preprocess writes it: values 1..N (unique, so a crop can be located), label 1 block, label 2 cube."""
    data = (np.arange(np.prod(shape), dtype=np.float32) + 1).reshape((1, *shape))
    seg = np.zeros(shape, np.uint8)
    seg[2:8, 2:10, 2:10] = 1
    seg[-4:-1, -4:-1, -4:-1] = 2
    write_npy(folder / f"{case_id}.npy", data)
    write_npy(folder / f"{case_id}_seg.npy", seg)
    write_npz(folder / f"{case_id}_fg.npz", foreground_locations(seg, case_id))
    write_json(folder / f"{case_id}.json", {"case": case_id, "has_label": True})
    return data, seg


def locate(patch_first_value):
    """Start index of a crop whose first voxel holds ``patch_first_value`` (see write_case)."""
    return np.unravel_index(int(patch_first_value) - 1, SHAPE)


def config(patch, batch=2):
    return {"patch_size": list(patch), "batch_size": batch}


def test_load_case_memmaps_and_names_broken_file(tmp_path):
    write_case(tmp_path)
    case = load_case(tmp_path, "case_0")
    assert isinstance(case.data, np.memmap) and isinstance(case.seg, np.memmap)
    assert case.data.shape == (1, *SHAPE) and sorted(case.fg) == [1, 2] and case.fg[2].shape == (27, 3)
    (tmp_path / "case_0_seg.npy").unlink()
    with pytest.raises(AutosegError, match=r"case_0_seg\.npy.*plan_and_preprocess"):
        load_case(tmp_path, "case_0")


def test_sample_patch_3d_is_exact_crop(tmp_path):
    data, seg = write_case(tmp_path)
    case = load_case(tmp_path, "case_0")
    rng = np.random.default_rng(0)
    for _ in range(5):
        d, s = sample_patch(case, (8, 10, 12), None, rng)
        assert d.shape == (1, 8, 10, 12) and d.dtype == np.float32 and s.shape == (1, 8, 10, 12)
        z, y, x = locate(d[0, 0, 0, 0])
        np.testing.assert_array_equal(d, data[:, z:z + 8, y:y + 10, x:x + 12])
        np.testing.assert_array_equal(s[0], seg[z:z + 8, y:y + 10, x:x + 12])


def test_sample_patch_2d_is_one_slice(tmp_path):
    data, seg = write_case(tmp_path)
    case = load_case(tmp_path, "case_0")
    d, s = sample_patch(case, (10, 12), case.fg[1][0], np.random.default_rng(1))
    assert d.shape == (1, 10, 12) and s.shape == (1, 10, 12) and s.max() > 0
    z, y, x = locate(d[0, 0, 0])
    np.testing.assert_array_equal(d[0], data[0, z, y:y + 10, x:x + 12])
    np.testing.assert_array_equal(s[0], seg[z, y:y + 10, x:x + 12])


def test_sample_patch_pads_small_image_with_zeros(tmp_path):
    data, seg = write_case(tmp_path)
    case = load_case(tmp_path, "case_0")
    rng = np.random.default_rng(2)
    starts = set()
    for centre in (None, case.fg[2][0], None):
        d, s = sample_patch(case, (32, 32, 32), centre, rng)
        assert d.shape == (1, 32, 32, 32)
        inside = np.argwhere(d[0] > 0)
        lo = inside.min(0)
        assert (inside.max(0) - lo + 1).tolist() == list(SHAPE)  # the whole image, once, zeros around it
        assert d.sum() == data.sum() and np.array_equal(np.bincount(s.ravel())[1:], np.bincount(seg.ravel())[1:])
        starts.add(tuple(lo))
    assert len(starts) > 1  # placed at random, not always in the corner


def centred_patch(case, index, rng, patch, inner=None):
    """A patch centred as the training loader centres it: class and component from the index, then a voxel."""
    _, label, comp = index.draw(rng)
    centre = None if label is None else pick_voxel(case.fg[label], case.components[label], comp, rng)
    return label, sample_patch(case, patch, centre, rng, inner=inner)[1]


def test_centred_patches_hold_foreground_of_each_class(tmp_path):
    write_case(tmp_path)
    case = load_case(tmp_path, "case_0")
    index = sampling_index(tmp_path, ["case_0"], ())
    rng = np.random.default_rng(3)
    draws = [centred_patch(case, index, rng, (6, 6, 6)) for _ in range(60)]
    forced = [s for label, s in draws if label is not None]
    assert len(forced) >= 30 and all(s.max() > 0 for s in forced)
    assert sum((s == 2).any() for s in forced) >= len(forced) // 3
    free = [s for label, s in draws if label is None]
    assert sum(s.max() == 0 for s in free) >= 5  # so the centred result is not an accident of the case


def test_centre_voxel_lies_in_inner_region(tmp_path):
    write_case(tmp_path)
    case = load_case(tmp_path, "case_0")
    rng = np.random.default_rng(4)
    for i in range(10):
        s = sample_patch(case, (16, 16, 16), case.fg[1 + i % 2][i], rng, inner=(6, 6, 6))[1]
        assert s[0, 5:11, 5:11, 5:11].max() > 0


def test_enlarged_patch_size():
    still = AugmentConfig(rotation_2d_deg=0, rotation_3d_deg=0, scale=(1.0, 1.0))
    assert enlarged_patch_size([64, 48], still) == [64, 48]
    big = enlarged_patch_size([64, 64])  # +-180 deg: the 45 deg diagonal, times the largest scale 1.4
    assert all(p >= 64 * np.sqrt(2) * 1.4 and (p - 64) % 2 == 0 for p in big)
    aniso = enlarged_patch_size([8, 64, 64])  # in-plane only: depth grows by the scale alone
    assert aniso[0] == 12 and aniso[1] >= 126


@pytest.mark.parametrize("patch", [(12, 12, 12), (4, 24, 24), (24, 24)])
def test_spatial_transform_never_reads_past_enlarged_patch(patch):
    only_spatial = dataclasses.replace(
        AUGMENT, p_rotation=1.0, p_scale=1.0, p_noise=0, p_blur=0, p_brightness=0, p_contrast=0, p_lowres=0,
        p_gamma_inverted=0, p_gamma=0, mirror=False,
    )
    big = enlarged_patch_size(patch)
    tr = build_transforms(patch, only_spatial)
    np.random.seed(0)
    for _ in range(10):  # constant ones inside the read patch: a zero would mean the grid left it
        out = tr(data=np.ones((1, 1, *big), np.float32), seg=np.ones((1, 1, *big), np.float32))
        assert out["data"].shape == (1, 1, *patch)
        assert out["data"].min() > 0.99 and out["seg"].min() == 1


def test_augmented_batches_keep_shapes_dtype_and_labels(tmp_path):
    write_case(tmp_path)
    loader = BatchLoader(tmp_path, ["case_0"], config((16, 16, 16)), DS3, num_workers=0)
    for _ in range(4):
        b = next(loader)
        assert b["data"].dtype == torch.float32 and b["data"].shape == (2, 1, 16, 16, 16)
        assert [tuple(t.shape) for t in b["target"]] == [(2, 1, 16, 16, 16), (2, 1, 8, 8, 8), (2, 1, 4, 4, 4)]
        assert set(torch.unique(b["target"][0]).tolist()) <= {0, 1, 2}
        assert b["keys"] == ["case_0", "case_0"]
    loader.close()


def test_unaugmented_batch_is_exact_crop_and_ds_is_strided(tmp_path):
    data, seg = write_case(tmp_path)
    loader = BatchLoader(tmp_path, ["case_0"], config((8, 8, 12)), [[1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.5, 0.25]],
                         augment=False, num_workers=0)
    b = next(loader)
    for i in range(2):
        z, y, x = locate(b["data"][i, 0, 0, 0, 0])
        np.testing.assert_array_equal(b["data"][i].numpy(), data[:, z:z + 8, y:y + 8, x:x + 12])
        np.testing.assert_array_equal(b["target"][0][i, 0].numpy(), seg[z:z + 8, y:y + 8, x:x + 12])
    full = b["target"][0]
    assert full.dtype == torch.int64
    assert torch.equal(b["target"][1], full[..., ::2, ::2, ::2])
    assert torch.equal(b["target"][2], full[..., ::4, ::2, ::4]) and b["target"][2].shape[2:] == (2, 4, 3)


def test_downsample_labels_non_integer_factor():
    seg = np.arange(6).reshape(1, 1, 6)
    np.testing.assert_array_equal(downsample_labels(seg, [0.5]), [[[0, 2, 4]]])
    np.testing.assert_array_equal(downsample_labels(seg, [0.34]), [[[0, 3]]])  # round(2.04) = 2 voxels


def test_region_targets():
    seg = np.array([[0, 1, 2], [3, 4, 4]])
    out = region_targets(seg, [[3, 4], [4], [1, 2, 3, 4]])
    assert out.dtype == np.uint8 and out.shape == (3, 2, 3)
    np.testing.assert_array_equal(out[0], [[0, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(out[1], [[0, 0, 0], [0, 1, 1]])
    np.testing.assert_array_equal(out[2], seg > 0)


def test_region_batches(tmp_path):
    write_case(tmp_path)
    loader = BatchLoader(tmp_path, ["case_0"], config((8, 8, 8)), [[1, 1, 1], [0.5, 0.5, 0.5]], augment=False,
                         num_workers=0, regions=[[1, 2], [2]])
    t = next(loader)["target"]
    assert t[0].dtype == torch.float32 and t[0].shape == (2, 2, 8, 8, 8) and t[1].shape == (2, 2, 4, 4, 4)
    assert torch.all(t[0][:, 1] <= t[0][:, 0])  # label 2 is inside region {1, 2}


def first_batches(folder, seed, workers, n=3):
    loader = BatchLoader(folder, ["case_0", "case_1"], config((12, 12, 12)), DS3, seed=seed, num_workers=workers)
    out = [next(loader) for _ in range(n)]
    loader.close()
    return out


def same(a, b):
    return a["keys"] == b["keys"] and torch.equal(a["data"], b["data"]) and all(
        torch.equal(x, y) for x, y in zip(a["target"], b["target"]))


def test_loader_is_deterministic_per_seed_and_worker_count(tmp_path):
    write_case(tmp_path, "case_0")
    write_case(tmp_path, "case_1")
    state, py_state = np.random.get_state()[1].copy(), random.getstate()
    a, b, c = first_batches(tmp_path, 0, 0), first_batches(tmp_path, 0, 0), first_batches(tmp_path, 1, 0)
    assert all(same(x, y) for x, y in zip(a, b))
    assert not any(same(x, y) for x, y in zip(a, c))
    assert np.array_equal(np.random.get_state()[1], state) and random.getstate() == py_state  # caller's RNGs kept
    w = first_batches(tmp_path, 0, 1)  # one worker process draws the same stream as in-process
    assert all(same(x, y) for x, y in zip(a, w))
    assert not multiprocessing.active_children()  # close() stopped the worker


@pytest.mark.parametrize("workers", [0, 1])
def test_worker_failure_names_the_case(tmp_path, workers):
    write_case(tmp_path, "case_bad")
    loader = BatchLoader(tmp_path, ["case_bad"], config((8, 8, 8)), [[1, 1, 1]], num_workers=workers)
    (tmp_path / "case_bad.npy").write_bytes(b"not a numpy file")
    with pytest.raises((AutosegError, RuntimeError), match=r"case_bad(.|\n)*case_bad\.npy"):
        next(loader)
    loader.close()


def test_missing_case_is_reported_up_front(tmp_path):
    write_case(tmp_path)
    with pytest.raises(AutosegError, match="case_9"):
        BatchLoader(tmp_path, ["case_0", "case_9"], config((8, 8, 8)), [[1, 1, 1]], num_workers=0)
