"""Separable resampling of (C, Z, Y, X) float32 volumes and of label maps, in numpy.

Each axis is resampled on its own with a 1D kernel (nearest, linear, or Keys cubic convolution), so the cost is a
handful of vectorised gathers per axis; no per-slice Python loops and no float64 copies. Voxel centres are aligned
(``x_src = (i + 0.5) * n_in / n_out - 0.5``), borders replicate the edge voxel. An axis whose size does not change
is left untouched, so resampling to the same shape is an exact identity.

Orders: 0 nearest, 1 linear, 3 cubic. Label maps are resampled as one soft mask per label value (linear, or
nearest on an out-of-plane axis), and each voxel takes the label whose mask is largest: the "one-hot, then
interpolate" rule that avoids the label mixing of interpolating label values directly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _taps(n_in: int, n_out: int, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices (K, n_out) and weights (K, n_out) for one axis."""
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    if order == 0:
        idx = np.clip(np.floor(x + 0.5), 0, n_in - 1).astype(np.intp)[None]
        return idx, np.ones((1, n_out), dtype=np.float32)
    base = np.floor(x)
    t = x - base
    if order == 1:
        offsets, w = (0, 1), [1.0 - t, t]
    elif order == 3:
        a = -0.5  # Keys (Catmull-Rom): interpolating, third-order accurate
        d = [1.0 + t, t, 1.0 - t, 2.0 - t]
        w = [
            a * d[0] ** 3 - 5 * a * d[0] ** 2 + 8 * a * d[0] - 4 * a,
            (a + 2) * d[1] ** 3 - (a + 3) * d[1] ** 2 + 1,
            (a + 2) * d[2] ** 3 - (a + 3) * d[2] ** 2 + 1,
            a * d[3] ** 3 - 5 * a * d[3] ** 2 + 8 * a * d[3] - 4 * a,
        ]
        offsets = (-1, 0, 1, 2)
    else:
        raise ValueError(f"interpolation order must be 0, 1 or 3, got {order}")
    idx = np.stack([np.clip(base + o, 0, n_in - 1) for o in offsets]).astype(np.intp)
    return idx, np.stack(w).astype(np.float32)


def _resample_axis(arr: np.ndarray, axis: int, n_out: int, order: int) -> np.ndarray:
    n_in = arr.shape[axis]
    if n_in == n_out:
        return arr
    idx, w = _taps(n_in, n_out, order)
    shape = [1] * arr.ndim
    shape[axis] = n_out
    out = np.take(arr, idx[0], axis=axis)
    if len(idx) == 1:
        return out
    out *= w[0].reshape(shape)
    for k in range(1, len(idx)):
        out += np.take(arr, idx[k], axis=axis) * w[k].reshape(shape)
    return out


def resample_array(data: np.ndarray, new_shape: Sequence[int], orders: Sequence[int]) -> np.ndarray:
    """Resample (C, *spatial) float data to ``new_shape`` with one interpolation order per spatial axis.

    Axes that shrink are processed first so later passes touch fewer voxels.
    """
    spatial = data.shape[1:]
    if len(new_shape) != len(spatial) or len(orders) != len(spatial):
        raise ValueError(f"new_shape {tuple(new_shape)} / orders {tuple(orders)} do not match data {data.shape}")
    out = data.astype(np.float32, copy=False)
    for ax in sorted(range(len(spatial)), key=lambda a: new_shape[a] / spatial[a]):
        out = _resample_axis(out, ax + 1, int(new_shape[ax]), int(orders[ax]))
    return out if out is not data else out.copy()


def resample_labels(seg: np.ndarray, new_shape: Sequence[int], orders: Sequence[int]) -> np.ndarray:
    """Resample a (*spatial) integer label map; each voxel takes the label with the largest interpolated mask.

    Memory stays at two float32 volumes whatever the number of labels.
    """
    if tuple(seg.shape) == tuple(new_shape):
        return seg.copy()
    values = np.unique(seg)
    best = np.full(tuple(new_shape), -np.inf, dtype=np.float32)
    out = np.zeros(tuple(new_shape), dtype=seg.dtype)
    for v in values:
        soft = resample_array((seg == v)[None].astype(np.float32), new_shape, orders)[0]
        take = soft > best
        out[take] = v
        np.maximum(best, soft, out=best)
    return out


def case_memory_bytes(shape: Sequence[int], new_shape: Sequence[int], channels: int, outputs: int = 0) -> int:
    """Peak bytes to preprocess a (channels, *shape) case to ``new_shape`` and, with ``outputs`` network outputs,
    to predict it: float32 image and two resampling buffers per channel on the new grid, logits, weights and
    probabilities there, and the probabilities resampled back onto the original grid."""
    n_in = float(np.prod(shape, dtype=np.float64))
    n_out = float(np.prod(new_shape, dtype=np.float64))
    per_out = 3 * channels + (3 * outputs + 1 if outputs else 2)
    return int(4 * (n_out * per_out + n_in * (channels + 2 * outputs)))
