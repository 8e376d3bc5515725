"""Sliding-window inference: identity and mirroring exactness, tiling and the Gaussian importance map."""

import numpy as np
import pytest
import torch
from torch import nn

from autoseg.inference.predictor import gaussian_importance, sliding_window, tile_starts


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------- sliding window


class Identity(nn.Module):
    """Returns its input (logits = image), recording the tile shapes it was called with."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return x


class PlusOne(nn.Module):
    def forward(self, x):
        return x + 1


@pytest.mark.parametrize(
    "shape, patch, mirror",
    [
        ((2, 20, 37, 41), (8, 16, 16), ()),  # patch smaller than the image on every axis
        ((1, 6, 10, 12), (8, 16, 16), ()),  # larger on every axis: padded, then cropped back
        ((1, 5, 40, 9), (8, 16, 16), ()),  # larger on some axes, smaller on others
        ((1, 12, 20, 18), (8, 16, 16), (0, 1, 2)),  # mirroring over every axis
        ((2, 12, 20, 18), (8, 16, 16), (1, 2)),
        ((1, 5, 30, 22), (16, 16), ()),  # 2D patch over the axial slices of a 3D volume
        ((1, 3, 12, 40), (16, 16), (0, 1)),  # 2D, padded in y, mirrored
    ],
)
def test_sliding_window_identity_reproduces_input(shape, patch, mirror):
    data = torch.randn(shape)
    net = Identity()
    out = sliding_window(net, data.clone(), patch, shape[0], mirror_axes=mirror)
    assert out.dtype == torch.float32 and out.shape == data.shape
    torch.testing.assert_close(out, data, atol=1e-5, rtol=0)
    expected_tile = tuple(patch)
    assert net.shapes and all(s[1] == shape[0] and s[2:] == expected_tile for s in net.shapes)
    assert all(s[0] <= 2 for s in net.shapes)  # tile_batch
    n_tiles = sum(s[0] for s in net.shapes) // (2 ** len(mirror))
    full = (1, *patch) if len(patch) == 2 else patch
    expected = np.prod([len(tile_starts(max(n, p), p, 0.5)) for n, p in zip(shape[1:], full)])
    assert n_tiles == expected
    if len(patch) == 2:  # each axial slice is predicted once per in-plane tile, never twice
        assert n_tiles == shape[1] * np.prod([len(tile_starts(max(n, p), p, 0.5)) for n, p in zip(shape[2:], patch)])


def test_sliding_window_averages_mirrors_and_tiles():
    data = torch.randn(1, 10, 20, 20)
    out = sliding_window(PlusOne(), data, (8, 16, 16), 1, mirror_axes=(0, 1, 2))
    torch.testing.assert_close(out, data + 1, atol=1e-5, rtol=0)


def test_gaussian_importance():
    w = gaussian_importance((8, 16, 16))
    assert w.shape == (8, 16, 16) and w.dtype == torch.float32
    assert float(w.max()) == pytest.approx(1.0, abs=1e-6) and float(w.min()) >= 1e-3
    assert torch.equal(w, torch.flip(w, (0, 1, 2)))  # symmetric
    assert float(w[4, 8, 8]) > float(w[0, 8, 8]) > float(w[0, 0, 0])  # centre trusted most


@pytest.mark.parametrize("size, patch, step", [(100, 32, 0.5), (33, 32, 0.5), (64, 32, 0.5), (97, 20, 0.3),
                                               (50, 50, 0.5), (10, 32, 0.5), (1000, 7, 1.0)])
def test_tile_starts_cover_axis_flush_to_end(size, patch, step):
    starts = tile_starts(size, patch, step)
    assert starts[0] == 0
    if size <= patch:
        assert starts == [0]
        return
    assert starts[-1] == size - patch  # last tile flush with the end
    assert starts == sorted(set(starts))
    assert max(b - a for a, b in zip(starts, starts[1:])) <= patch * step + 1e-9  # overlap >= 1 - step
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s : s + patch] = True
    assert covered.all()


def test_tile_starts_one_voxel_patch_visits_each_slice_once():
    assert tile_starts(5, 1, 0.5) == [0, 1, 2, 3, 4]
    assert tile_starts(40, 1, 0.5) == list(range(40))
