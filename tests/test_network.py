"""The U-Net is built from plans alone: shapes follow the planned strides, and it trains, in bf16 and channels-last."""

import copy

import pytest
import torch
import torch.nn.functional as F

from autoseg.planning import planner
from autoseg.network import ConvBlock, ResidualBlock, UNet, build_network, count_parameters, ds_scales


def config(dims, patch, strides, kernels, features, encoder="plain", deep_supervision=True):
    return {
        "dims": dims,
        "patch_size": patch,
        "network": {
            "encoder": encoder,
            "strides": strides,
            "kernel_sizes": kernels,
            "features": features,
            "convs_per_stage": 2,
            "deep_supervision": deep_supervision,
        },
    }


def with_net(cfg, **changes):
    """A copy of ``cfg`` with some ``network`` fields changed."""
    out = copy.deepcopy(cfg)
    out["network"].update(changes)
    return out


ANISO_3D = config(
    3, [16, 32, 32], [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
    [4, 8, 16, 16],
)
PLAN_2D = config(2, [32, 48], [[1, 1], [2, 2], [2, 2], [2, 1]], [[3, 3]] * 4, [4, 8, 16, 16])
TINY_3D = config(3, [8, 16, 16], [[1, 1, 1], [1, 2, 2], [2, 2, 2]], [[1, 3, 3], [3, 3, 3], [3, 3, 3]], [4, 8, 16])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_3d_anisotropic_deep_supervision_shapes_match_ds_scales():
    net = build_network(ANISO_3D, in_channels=2, num_outputs=3)
    assert isinstance(net, UNet) and net.deep_supervision
    with torch.no_grad():
        outs = net(torch.randn(2, 2, 16, 32, 32))
    assert [tuple(o.shape) for o in outs] == [(2, 3, 16, 32, 32), (2, 3, 16, 16, 16), (2, 3, 8, 8, 8)]
    scales = ds_scales(ANISO_3D)
    assert scales == [[1.0, 1.0, 1.0], [1.0, 0.5, 0.5], [0.5, 0.25, 0.25]]
    for o, sc in zip(outs, scales):
        assert list(o.shape[2:]) == [round(p * s) for p, s in zip(ANISO_3D["patch_size"], sc)]


def test_2d_shapes_and_deep_supervision_off():
    net = build_network(PLAN_2D, in_channels=1, num_outputs=2)
    x = torch.randn(3, 1, 32, 48)
    with torch.no_grad():
        outs = net(x)
        assert [tuple(o.shape) for o in outs] == [(3, 2, 32, 48), (3, 2, 16, 24), (3, 2, 8, 12)]
        assert ds_scales(PLAN_2D) == [[1.0, 1.0], [0.5, 0.5], [0.25, 0.25]]
        net.deep_supervision = False
        single = net(x)
    assert isinstance(single, torch.Tensor) and single.shape == (3, 2, 32, 48)
    assert torch.allclose(single, outs[0])  # same full-resolution logits, lower heads simply skipped
    assert build_network(with_net(PLAN_2D, deep_supervision=False), 1, 2).deep_supervision is False


def test_residual_encoder_bigger_same_shapes_and_trains():
    plain = build_network(ANISO_3D, 1, 2)
    res = build_network(ANISO_3D, 1, 2, encoder="residual")
    from_plan = build_network(with_net(ANISO_3D, encoder="residual"), 1, 2)
    assert isinstance(plain.encoder[0][0], ConvBlock)
    assert isinstance(res.encoder[0][0], ResidualBlock) and isinstance(from_plan.encoder[0][0], ResidualBlock)
    assert count_parameters(res) > count_parameters(plain)
    x = torch.randn(1, 1, 16, 32, 32)
    outs_res = res(x)
    with torch.no_grad():
        outs_plain = plain(x)
    assert [o.shape for o in outs_res] == [o.shape for o in outs_plain]
    sum(o.square().mean() for o in outs_res).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in res.parameters())
    with pytest.raises(ValueError):
        build_network(ANISO_3D, 1, 2, encoder="dense")


def test_parameter_count_matches_planner_estimate():
    net_cfg = {
        "encoder": "plain",
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
        "kernel_sizes": [[3, 3, 3]] * 6,
        "features": [32, 64, 128, 256, 320, 320],
        "convs_per_stage": 2,
        "deep_supervision": True,
    }
    net = build_network({"dims": 3, "patch_size": [128, 128, 128], "network": net_cfg}, 1, 3)
    ours, estimate = count_parameters(net), planner.count_parameters(net_cfg, 1, 3)
    assert abs(ours - estimate) / estimate < 0.05, (ours, estimate)


def test_bf16_autocast_close_to_fp32():
    net = build_network(ANISO_3D, 1, 2)
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        ref = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x)
    for r, lo in zip(ref, low):
        assert lo.dtype == torch.bfloat16  # autocast really ran the head in bf16
        assert ((lo.float() - r).norm() / r.norm()).item() < 0.05


def test_channels_last_3d_matches_contiguous():
    net = build_network(ANISO_3D, 1, 2, encoder="residual")
    cl = copy.deepcopy(net).to(memory_format=torch.channels_last_3d)
    assert cl.encoder[0][0].conv1[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 1, 16, 32, 32)
    with torch.no_grad():
        ref = net(x)
        out = cl(x.to(memory_format=torch.channels_last_3d))
    for r, o in zip(ref, out):
        assert torch.allclose(r, o, atol=1e-4)


def test_tiny_net_overfits_and_every_parameter_gets_gradient():
    net = build_network(TINY_3D, 1, 2)
    x = torch.randn(1, 1, 8, 16, 16)
    target = torch.randint(0, 2, (1, 1, 4, 4, 4)).float()
    target = F.interpolate(target, size=(8, 16, 16), mode="nearest")  # blobs, learnable in a few steps
    targets = [F.interpolate(target, scale_factor=s, mode="nearest")[:, 0].long() for s in ds_scales(TINY_3D)]

    def loss_fn():
        return sum(F.cross_entropy(o, t) for o, t in zip(net(x), targets))

    loss = loss_fn()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    first = loss.item()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(50):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first, (first, loss.item())
