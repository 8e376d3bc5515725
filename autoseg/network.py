"""The U-Net, built only from a plans configuration entry (``build_network``), in the nnU-Net style.

Encoder stage ``s`` starts with a conv of stride ``strides[s]`` (stage 0: stride 1), so downsampling is learned and
anisotropic strides/kernels from the planner apply unchanged; every conv is Conv -> InstanceNorm -> LeakyReLU.
The ``residual`` encoder (nnU-Net ResEnc style) replaces each plain conv of a stage by a residual basic block; the
decoder always stays plain: transposed conv (kernel = stride) to the skip's features, concatenate, convs, and a
1x1 head per decoder stage for deep supervision.

Two optional plan keys describe networks imported from nnU-Net (``autoseg import-nnunet``): ``encoder_convs`` and
``decoder_convs`` give the conv (or residual block) count per stage where it is not ``convs_per_stage`` everywhere
(ResEnc: 1, 3, 4, 6, ... blocks), and ``stem`` puts one conv block before the first stage (ResEnc's stem).

The network stays autocast- and channels-last-friendly: no Python-side dtype casts, and in-place ops only on
fresh activations (LeakyReLU after a norm or an add), never on a tensor autograd still needs.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

_OPS = {
    2: (nn.Conv2d, nn.ConvTranspose2d, nn.InstanceNorm2d, nn.AvgPool2d),
    3: (nn.Conv3d, nn.ConvTranspose3d, nn.InstanceNorm3d, nn.AvgPool3d),
}


def _norm(dims: int, channels: int) -> nn.Module:
    return _OPS[dims][2](channels, eps=1e-5, affine=True)


class ConvBlock(nn.Sequential):
    """Conv -> InstanceNorm -> LeakyReLU: instance norm because 3D batches are too small for batch statistics."""

    def __init__(self, dims: int, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int]):
        conv = _OPS[dims][0](cin, cout, list(kernel), list(stride), padding=[k // 2 for k in kernel], bias=True)
        super().__init__(conv, _norm(dims, cout), nn.LeakyReLU(0.01, inplace=True))


class ResidualBlock(nn.Module):
    """Basic block (conv-norm-act, conv-norm, + skip, act) as in nnU-Net ResEnc: skips keep deep encoders trainable.

    The skip is the identity unless shape or channels change; then it average-pools by the stride (no information
    thrown away like a strided 1x1 would) and projects channels with a bias-free 1x1 conv + norm.
    """

    def __init__(self, dims: int, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int]):
        super().__init__()
        conv, _, _, pool = _OPS[dims]
        self.conv1 = ConvBlock(dims, cin, cout, kernel, stride)
        self.conv2 = nn.Sequential(
            conv(cout, cout, list(kernel), 1, padding=[k // 2 for k in kernel], bias=True), _norm(dims, cout)
        )
        skip: list[nn.Module] = []
        if any(s != 1 for s in stride):
            skip.append(pool(list(stride), list(stride)))
        if cin != cout:
            skip += [conv(cin, cout, 1, bias=False), _norm(dims, cout)]
        self.skip = nn.Sequential(*skip)  # empty Sequential is the identity
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.skip(x))


class DecoderStage(nn.Module):
    """Upsample with a transposed conv (kernel = stride, learned), concatenate the encoder skip, then plain convs."""

    def __init__(self, dims: int, cin: int, cout: int, stride: Sequence[int], kernel: Sequence[int], n_convs: int):
        super().__init__()
        self.up = _OPS[dims][1](cin, cout, list(stride), list(stride), bias=True)
        ones = [1] * dims
        self.convs = nn.Sequential(
            *[ConvBlock(dims, 2 * cout if i == 0 else cout, cout, kernel, ones) for i in range(n_convs)]
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat((self.up(x), skip), dim=1))


class UNet(nn.Module):
    """nnU-Net-style U-Net; ``deep_supervision`` switches between training (all heads) and inference (full res).

    With deep supervision ``forward`` returns one logits tensor per decoder stage, highest resolution first (their
    scales relative to the input are ``ds_scales``); without it only the full-resolution logits are computed.
    """

    def __init__(
        self,
        dims: int,
        in_channels: int,
        num_outputs: int,
        strides: Sequence[Sequence[int]],
        kernel_sizes: Sequence[Sequence[int]],
        features: Sequence[int],
        convs_per_stage: int | Sequence[int],
        encoder: str,
        deep_supervision: bool,
        decoder_convs: Sequence[int] | None = None,
        stem: bool = False,
    ):
        super().__init__()
        if encoder not in ("plain", "residual"):
            raise ValueError(f"encoder must be 'plain' or 'residual', got {encoder!r}")
        n = len(features)
        encoder_convs = [convs_per_stage] * n if isinstance(convs_per_stage, int) else list(convs_per_stage)
        decoder_convs = [encoder_convs[0]] * (n - 1) if decoder_convs is None else list(decoder_convs)
        if len(encoder_convs) != n or len(decoder_convs) != n - 1 or min(encoder_convs + decoder_convs, default=1) < 1:
            raise ValueError(f"{n} stages need {n} encoder and {n - 1} decoder conv counts >= 1, got "
                             f"{encoder_convs} and {decoder_convs}")
        block = ResidualBlock if encoder == "residual" else ConvBlock
        ones = [1] * dims
        self.deep_supervision = deep_supervision
        # registered only when planned, so the weights of a network without a stem keep their names
        self.stem = ConvBlock(dims, in_channels, features[0], kernel_sizes[0], ones) if stem else None
        self.encoder = nn.ModuleList()
        cin = features[0] if stem else in_channels
        for stride, kernel, f, convs in zip(strides, kernel_sizes, features, encoder_convs):
            self.encoder.append(
                nn.Sequential(*[block(dims, cin if i == 0 else f, f, kernel, stride if i == 0 else ones)
                                for i in range(convs)])
            )
            cin = f
        # decoder[s] and heads[s] work at the resolution of encoder stage s (index 0 = full resolution)
        self.decoder = nn.ModuleList(
            DecoderStage(dims, features[s + 1], features[s], strides[s + 1], kernel_sizes[s], decoder_convs[s])
            for s in range(n - 1)
        )
        self.num_outputs = num_outputs
        self.heads = nn.ModuleList(_OPS[dims][0](features[s], num_outputs, 1) for s in range(len(features) - 1))
        self.apply(_init_he)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        skips = []
        if self.stem is not None:
            x = self.stem(x)
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        outputs = []
        for s in reversed(range(len(self.decoder))):
            x = self.decoder[s](x, skips[s])
            if self.deep_supervision:
                outputs.append(self.heads[s](x))
        if not self.deep_supervision:
            return self.heads[0](x)
        return outputs[::-1]


def _init_he(module: nn.Module) -> None:
    """Kaiming-normal weights (a=1e-2, matching LeakyReLU) and zero biases, like nnU-Net's InitWeights_He."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_network(config: dict[str, Any], in_channels: int, num_outputs: int, encoder: str | None = None) -> UNet:
    """The U-Net of one plans configuration (``plans["configurations"][name]``); ``encoder`` overrides the plan's."""
    net, dims = config["network"], int(config["dims"])
    n = len(net["features"])
    if len(net["strides"]) != n or len(net["kernel_sizes"]) != n or any(
        len(v) != dims for v in list(net["strides"]) + list(net["kernel_sizes"])
    ):
        raise ValueError(f"network {net} does not have {n} stages of {dims}-element strides and kernel sizes")
    return UNet(
        dims=dims,
        in_channels=in_channels,
        num_outputs=num_outputs,
        strides=net["strides"],
        kernel_sizes=net["kernel_sizes"],
        features=net["features"],
        convs_per_stage=[int(c) for c in net.get("encoder_convs", [net["convs_per_stage"]] * n)],
        encoder=encoder or net["encoder"],
        deep_supervision=bool(net["deep_supervision"]),
        decoder_convs=[int(c) for c in net.get("decoder_convs", [net["convs_per_stage"]] * (n - 1))],
        stem=bool(net.get("stem", False)),
    )


def ds_scales(config: dict[str, Any]) -> list[list[float]]:
    """Scale of each deep-supervision output relative to the patch (first all ones), to downsample the targets."""
    cumulative = np.cumprod(np.array(config["network"]["strides"], dtype=np.float64), axis=0)[:-1]
    return [[float(1.0 / v) for v in row] for row in cumulative]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (for comparing with the planner's estimate)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
