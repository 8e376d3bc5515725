"""Sliding-window inference: the one implementation shared by training validation and ``autoseg predict``.

Tiles of the network's patch size are placed with a step of ``step`` patch sizes, each tile's logits are weighted
by a Gaussian importance map (sigma = 1/8 of the patch; tile centres are trusted more than borders) and
accumulated in float32, then divided by the summed weights. Optional mirroring test-time augmentation averages
the logits over every combination of flipped axes. A 2D network runs over the axial slices of a 3D volume.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import torch
from torch import nn


def gaussian_importance(patch: Sequence[int], sigma_scale: float = 1.0 / 8) -> torch.Tensor:
    """Separable Gaussian weights over a patch, max 1, strictly positive (so every voxel gets a weight)."""
    weights = torch.ones(tuple(patch), dtype=torch.float32)
    for ax, n in enumerate(patch):
        x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        g = torch.exp(-0.5 * (x / (n * sigma_scale)) ** 2).float()
        shape = [1] * len(patch)
        shape[ax] = n
        weights = weights * (g / g.max()).reshape(shape)
    return weights.clamp_min(1e-3)


def tile_starts(size: int, patch: int, step: float) -> list[int]:
    """Start offsets along one axis: evenly spread, first at 0, last flush with the end, overlap >= 1 - step."""
    if size <= patch:
        return [0]
    n = int(np.ceil((size - patch) / (patch * step))) + 1
    return [int(round(v)) for v in np.linspace(0, size - patch, n)]


def _forward(net: nn.Module, x: torch.Tensor, mirror_axes: Sequence[int]) -> torch.Tensor:
    """Logits for a batch of tiles, averaged over all flips of ``mirror_axes`` (spatial axes, 0-based)."""
    out = net(x).float()
    combos = [c for r in range(1, len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, r)]
    for combo in combos:
        dims = [a + 2 for a in combo]
        out = out + torch.flip(net(torch.flip(x, dims)).float(), dims)  # not in place: net may return its input
    return out / (len(combos) + 1)


@torch.inference_mode()
def sliding_window(
    net: nn.Module,
    data: torch.Tensor,
    patch: Sequence[int],
    num_outputs: int,
    step: float = 0.5,
    mirror_axes: Sequence[int] = (),
    tile_batch: int = 2,
    device: torch.device | str = "cpu",
    autocast: bool = False,
) -> torch.Tensor:
    """Logits (num_outputs, *spatial) float32 on the CPU for ``data`` (C, *spatial) with a network in eval mode.

    ``patch`` has 2 entries for a 2D network (run slice by slice over axis 0 of 3D data) or 3 for a 3D one.
    Images smaller than the patch are padded with zeros (the normalised background) and cropped back.
    """
    device = torch.device(device)
    spatial = tuple(data.shape[1:])
    two_d = len(patch) == 2 and len(spatial) == 3
    full_patch = (1, *patch) if two_d else tuple(patch)
    pad = [max(0, p - s) for p, s in zip(full_patch, spatial)]
    if any(pad):
        widths = []
        for p in reversed(pad):
            widths += [p // 2, p - p // 2]
        data = nn.functional.pad(data, widths)
    padded = tuple(data.shape[1:])
    weight = gaussian_importance(patch).to(device)
    if two_d:
        weight = weight[None]
    logits = torch.zeros((num_outputs, *padded), dtype=torch.float32, device=device)
    norm = torch.zeros(padded, dtype=torch.float32, device=device)
    starts = [tile_starts(s, p, step) for s, p in zip(padded, full_patch)]
    tiles = [tuple(slice(a, a + p) for a, p in zip(st, full_patch)) for st in itertools.product(*starts)]
    dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    for i in range(0, len(tiles), tile_batch):
        group = tiles[i : i + tile_batch]
        x = torch.stack([data[(slice(None),) + t] for t in group]).to(device, non_blocking=True)
        if two_d:
            x = x[:, :, 0]
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            out = _forward(net, x, mirror_axes)
        if two_d:
            out = out[:, :, None]
        for t, o in zip(group, out):
            logits[(slice(None),) + t] += o * weight
            norm[t] += weight
    logits /= norm
    if any(pad):
        logits = logits[(slice(None),) + tuple(slice(p // 2, p // 2 + s) for p, s in zip(pad, spatial))]
    return logits.cpu()
