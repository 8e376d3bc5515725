"""One-off check of ``autoseg import-nnunet`` against the real dynamic_network_architectures (not a dependency).

Install it anywhere outside the project, e.g. ``pip install --target /tmp/dna --no-deps
dynamic-network-architectures==0.4.4``, then ``PYTHONPATH=/tmp/dna python benchmarks/check_nnunet_import.py``.
For PlainConvUNet and ResidualEncoderUNet in 2D and 3D it builds the real network from the same arch_kwargs the
test suite uses, checks that the test helper's state_dict has exactly its keys and shapes, saves its weights the
way nnU-Net's trainer does, imports the folder and prints the largest logit difference between the real network
and the converted one on a random input.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from nnunet_helpers import arch_kwargs, nnunet_plans, state_dict, write_model  # noqa: E402

from autoseg.network import build_network  # noqa: E402
from autoseg.nnunet import import_nnunet  # noqa: E402
from autoseg.checkpoint import load_weights  # noqa: E402
from autoseg.jsonfile import read_json  # noqa: E402


def _locate(name: str):
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def real_network(kind: str, dims: int, n_out: int) -> torch.nn.Module:
    kw = dict(arch_kwargs(kind, dims))
    for key in ("conv_op", "norm_op", "nonlin"):
        kw[key] = _locate(kw[key])
    cls = _locate(f"dynamic_network_architectures.architectures.unet."
                  f"{'PlainConvUNet' if kind == 'plain' else 'ResidualEncoderUNet'}")
    net = cls(input_channels=1, num_classes=n_out, deep_supervision=False, **kw)
    net.apply(net.initialize)
    with torch.no_grad():  # instance-norm affine parameters away from 1/0, so they matter in the comparison
        for name, p in net.named_parameters():
            if ".norm." in name:
                p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def main() -> None:
    import dynamic_network_architectures

    print(f"dynamic_network_architectures from {Path(dynamic_network_architectures.__file__).parent}")
    torch.manual_seed(0)
    for kind in ("plain", "res"):
        for dims in (3, 2):
            config = "3d_fullres" if dims == 3 else "2d"
            net = real_network(kind, dims, 3)
            sd = net.state_dict()
            helper = state_dict(kind, arch_kwargs(kind, dims), 1, 3)
            same = {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in helper.items()}
            with tempfile.TemporaryDirectory() as tmp:
                folder = write_model(Path(tmp) / "nnUNet_results", nnunet_plans(kind, dims), config, {0: sd})
                target = import_nnunet(folder, Path(tmp) / "results")
                plans = read_json(target / "plans.json", "", "plans")
                ours = build_network(plans["configurations"][config], 1, 3)
                load_weights(target / "fold_0" / "checkpoint_final.safetensors", ours)
                ours.deep_supervision = False
                x = torch.randn(1, 1, 16, 32, 32) if dims == 3 else torch.randn(2, 1, 32, 32)
                with torch.no_grad():
                    ref, got = net(x), ours.eval()(x)
            print(f"{kind:5s} {dims}d: {len(sd)} state_dict keys, test helper has the same keys and shapes: {same}; "
                  f"max |logit difference| {float((ref - got).abs().max()):.2e} (logits up to "
                  f"{float(ref.abs().max()):.2f})")


if __name__ == "__main__":
    main()
