"""nnU-Net v2 model folders made in the test, without nnU-Net: plans, dataset.json and checkpoints with the key names,
tensor shapes, aliases and metadata of nnU-Net's trainer and dynamic_network_architectures' PlainConvUNet and
ResidualEncoderUNet, and an independent functional forward pass over such a state_dict (the reference logits).

Written from nnU-Net's module structure (``encoder.stages.S.0.convs.I.conv`` for PlainConvEncoder,
``encoder.stem`` and ``encoder.stages.S.blocks.B.conv1/conv2/skip`` for ResidualEncoder with BasicBlockD,
``decoder.stages/transpconvs/seg_layers`` counted from the bottleneck up, ``all_modules`` and
``decoder.encoder`` registering the same tensors a second time); autoseg's network code is not used here.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

META = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "liver_tumor": 2},
        "numTraining": 4, "file_ending": ".nii.gz"}
INTENSITY = {"0": {"max": 300.0, "mean": 80.5, "median": 82.0, "min": -200.0, "percentile_00_5": -150.25,
                   "percentile_99_5": 250.75, "std": 42.5}}


def arch_kwargs(kind: str, dims: int, conv_bias: bool = True) -> dict[str, Any]:
    """Small nnU-Net architecture kwargs: 4 stages (3 in 2D), anisotropic first stride and kernel in 3D."""
    if dims == 3:
        strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
        kernels = [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
        features = [4, 8, 12, 16]
    else:
        strides, kernels, features = [[1, 1], [2, 2], [2, 2]], [[3, 3], [3, 3], [3, 3]], [4, 8, 16]
    n = len(features)
    kw: dict[str, Any] = {
        "n_stages": n, "features_per_stage": features, "conv_op": f"torch.nn.modules.conv.Conv{dims}d",
        "kernel_sizes": kernels, "strides": strides, "n_conv_per_stage_decoder": [1] * (n - 1) if kind == "res" else
        [2] * (n - 1), "conv_bias": conv_bias, "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }
    if kind == "res":
        kw["n_blocks_per_stage"] = [1, 2, 3, 2][:n]
    else:
        kw["n_conv_per_stage"] = [2] * n
    return kw


def nnunet_plans(kind: str, dims: int, conv_bias: bool = True) -> dict[str, Any]:
    """nnU-Net v2 plans with the imported configuration (2d or 3d_fullres) and a 3d_fullres one beside it."""
    cls = "PlainConvUNet" if kind == "plain" else "ResidualEncoderUNet"

    def config(d: int) -> dict[str, Any]:
        return {
            "data_identifier": f"nnUNetPlans_{'2d' if d == 2 else '3d_fullres'}", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": [16, 32, 32] if d == 3 else [32, 32],
            "median_image_size_in_voxels": [40.0, 96.0, 96.0] if d == 3 else [96.0, 96.0],
            "spacing": [2.5, 0.8, 0.8] if d == 3 else [0.8, 0.8], "normalization_schemes": ["CTNormalization"],
            "use_mask_for_norm": [False], "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
            "architecture": {"network_class_name": f"dynamic_network_architectures.architectures.unet.{cls}",
                             "arch_kwargs": arch_kwargs(kind, d, conv_bias),
                             "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
            "batch_dice": d == 2,
        }

    configs = {"2d": config(2), "3d_fullres": config(3)}
    if dims == 2:
        configs["3d_fullres"]["architecture"]["arch_kwargs"] = arch_kwargs(kind, 3, conv_bias)
    return {
        "dataset_name": "Dataset777_NNPhantom", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [2.5, 0.8, 0.8], "original_median_shape_after_transp": [40, 96, 96],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": configs, "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": copy.deepcopy(INTENSITY),
    }


def old_style(plans: dict[str, Any], name: str) -> dict[str, Any]:
    """The same configuration in the older plans format (UNet_class_name, base and max features)."""
    plans = copy.deepcopy(plans)
    cfg = plans["configurations"][name]
    kw = cfg.pop("architecture")["arch_kwargs"]
    cfg.update(UNet_class_name="PlainConvUNet", UNet_base_num_features=kw["features_per_stage"][0],
               unet_max_num_features=kw["features_per_stage"][-1], n_conv_per_stage_encoder=kw["n_conv_per_stage"],
               n_conv_per_stage_decoder=kw["n_conv_per_stage_decoder"], conv_kernel_sizes=kw["kernel_sizes"],
               pool_op_kernel_sizes=kw["strides"], num_pool_per_axis=[2, 3, 3])
    return plans


# ------------------------------------------------------------------------------------------------- state_dict


def _conv_norm(sd: dict, prefix: str, cin: int, cout: int, kernel: list[int], bias: bool, gen: torch.Generator,
               norm: bool = True) -> None:
    """ConvDropoutNormReLU's tensors, registered under ``conv``/``norm`` and again under ``all_modules``."""
    fan_in = cin * int(np.prod(kernel))
    w = torch.randn(cout, cin, *kernel, generator=gen) * (2.0 / fan_in) ** 0.5
    sd[f"{prefix}.conv.weight"] = sd[f"{prefix}.all_modules.0.weight"] = w
    if bias:
        sd[f"{prefix}.conv.bias"] = sd[f"{prefix}.all_modules.0.bias"] = 0.1 * torch.randn(cout, generator=gen)
    if norm:
        sd[f"{prefix}.norm.weight"] = sd[f"{prefix}.all_modules.1.weight"] = 1 + 0.1 * torch.randn(cout, generator=gen)
        sd[f"{prefix}.norm.bias"] = sd[f"{prefix}.all_modules.1.bias"] = 0.1 * torch.randn(cout, generator=gen)


def state_dict(kind: str, kw: dict[str, Any], in_channels: int, n_out: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with exactly the keys and shapes of the nnU-Net network ``kw`` describes."""
    gen = torch.Generator().manual_seed(seed)
    f, k, st, bias = kw["features_per_stage"], kw["kernel_sizes"], kw["strides"], kw["conv_bias"]
    n, dims = kw["n_stages"], len(k[0])
    enc: dict[str, torch.Tensor] = {}
    cin = in_channels
    if kind == "res":
        _conv_norm(enc, "encoder.stem.convs.0", in_channels, f[0], k[0], bias, gen)
        cin = f[0]
    for s in range(n):
        blocks = kw["n_blocks_per_stage"][s] if kind == "res" else kw["n_conv_per_stage"][s]
        for b in range(blocks):
            c_in = cin if b == 0 else f[s]
            if kind == "plain":
                _conv_norm(enc, f"encoder.stages.{s}.0.convs.{b}", c_in, f[s], k[s], bias, gen)
                continue
            p = f"encoder.stages.{s}.blocks.{b}"
            _conv_norm(enc, f"{p}.conv1", c_in, f[s], k[s], bias, gen)
            _conv_norm(enc, f"{p}.conv2", f[s], f[s], k[s], bias, gen)
            pooled = b == 0 and any(v != 1 for v in st[s])
            if b == 0 and c_in != f[s]:
                _conv_norm(enc, f"{p}.skip.{int(pooled)}", c_in, f[s], [1] * dims, False, gen)
        cin = f[s]
    sd = dict(enc)
    for key, value in enc.items():  # the decoder keeps a reference to the encoder: its tensors once more
        sd[f"decoder.{key}"] = value
    for j in range(n - 1):  # decoder stage j: from the bottleneck (j = 0) up
        below, skip, stride = f[n - 1 - j], f[n - 2 - j], st[n - 1 - j]
        sd[f"decoder.transpconvs.{j}.weight"] = torch.randn(below, skip, *stride, generator=gen) * (1.0 / below) ** 0.5
        if bias:
            sd[f"decoder.transpconvs.{j}.bias"] = 0.1 * torch.randn(skip, generator=gen)
        for i in range(kw["n_conv_per_stage_decoder"][j]):
            _conv_norm(sd, f"decoder.stages.{j}.convs.{i}", 2 * skip if i == 0 else skip, skip, k[n - 2 - j], bias, gen)
        sd[f"decoder.seg_layers.{j}.weight"] = torch.randn(n_out, skip, *[1] * dims, generator=gen) * (1.0 / skip) ** 0.5
        sd[f"decoder.seg_layers.{j}.bias"] = 0.1 * torch.randn(n_out, generator=gen)
    return sd


def checkpoint(sd: dict[str, torch.Tensor], plans: dict, configuration: str, fold: int, **extra: Any) -> dict:
    """What nnUNetTrainer.save_checkpoint stores: weights, optimizer and scaler state, a log of numpy scalars,
    numpy EMA, init_args (plans, dataset.json, torch.device), trainer name, mirroring axes."""
    dice = [np.float64(0.61), np.float64(0.42)]
    return {
        "network_weights": sd,
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-5, "momentum": 0.99, "dampening": 0,
                                                            "weight_decay": 3e-5, "nesterov": True, "params": [0, 1]}]},
        "grad_scaler_state": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                              "_growth_tracker": 17},
        "logging": {"mean_fg_dice": [np.float64(np.nanmean(dice))], "ema_fg_dice": [np.float64(0.5)],
                    "dice_per_class_or_region": [dice], "train_losses": [np.float64(-0.7)],
                    "val_losses": [np.float32(-0.6)], "lrs": [0.01], "epoch_start_timestamps": [1.7e9],
                    "epoch_end_timestamps": [1.7e9 + 80]},
        "_best_ema": np.float64(0.55), "current_epoch": np.int64(1000),
        "init_args": {"plans": plans, "configuration": configuration, "fold": fold, "dataset_json": META,
                      "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2),
        **extra,
    }


def write_model(root: Path, plans: dict, configuration: str, folds: dict[int | str, dict[str, torch.Tensor]],
                meta: dict | None = None, **extra: Any) -> Path:
    """``root/Dataset777_NNPhantom/nnUNetTrainer__nnUNetPlans__<configuration>`` as nnU-Net writes it."""
    import json

    folder = root / plans["dataset_name"] / f"nnUNetTrainer__nnUNetPlans__{configuration}"
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(meta or META, indent=2))
    for fold, sd in folds.items():
        (folder / f"fold_{fold}").mkdir()
        torch.save(checkpoint(sd, plans, configuration, 0 if fold == "all" else int(fold), **extra),
                   folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


# ---------------------------------------------------------------------------------------------- reference forward


def _cnr(sd: dict, prefix: str, x: torch.Tensor, stride: list[int], act: bool = True) -> torch.Tensor:
    w = sd[f"{prefix}.conv.weight"]
    conv = F.conv3d if w.ndim == 5 else F.conv2d
    x = conv(x, w, sd.get(f"{prefix}.conv.bias"), stride=stride, padding=[(k - 1) // 2 for k in w.shape[2:]])
    x = F.instance_norm(x, weight=sd[f"{prefix}.norm.weight"], bias=sd[f"{prefix}.norm.bias"], eps=1e-5)
    return F.leaky_relu(x, 0.01) if act else x


def reference_logits(kind: str, kw: dict[str, Any], sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Full-resolution logits of the nnU-Net network ``kw`` with weights ``sd`` (functional, inference mode)."""
    n, st = kw["n_stages"], kw["strides"]
    ones = [1] * (x.ndim - 2)
    if kind == "res":
        x = _cnr(sd, "encoder.stem.convs.0", x, ones)
    skips = []
    for s in range(n):
        blocks = kw["n_blocks_per_stage"][s] if kind == "res" else kw["n_conv_per_stage"][s]
        for b in range(blocks):
            stride = st[s] if b == 0 else ones
            if kind == "plain":
                x = _cnr(sd, f"encoder.stages.{s}.0.convs.{b}", x, stride)
                continue
            p = f"encoder.stages.{s}.blocks.{b}"
            residual = x
            if any(v != 1 for v in stride):
                pool = F.avg_pool3d if x.ndim == 5 else F.avg_pool2d
                residual = pool(residual, stride, stride)
            proj = [key for key in sd if key.startswith(f"{p}.skip.") and key.endswith(".conv.weight")]
            if proj:
                residual = _cnr(sd, proj[0].removesuffix(".conv.weight"), residual, ones, act=False)
            out = _cnr(sd, f"{p}.conv2", _cnr(sd, f"{p}.conv1", x, stride), ones, act=False)
            x = F.leaky_relu(out + residual, 0.01)
        skips.append(x)
    x = skips[-1]
    for j in range(n - 1):
        w = sd[f"decoder.transpconvs.{j}.weight"]
        up = F.conv_transpose3d if w.ndim == 5 else F.conv_transpose2d
        x = up(x, w, sd.get(f"decoder.transpconvs.{j}.bias"), stride=list(w.shape[2:]))
        x = torch.cat((x, skips[-(j + 2)]), 1)
        for i in range(kw["n_conv_per_stage_decoder"][j]):
            x = _cnr(sd, f"decoder.stages.{j}.convs.{i}", x, ones)
    conv = F.conv3d if x.ndim == 5 else F.conv2d
    return conv(x, sd[f"decoder.seg_layers.{n - 2}.weight"], sd[f"decoder.seg_layers.{n - 2}.bias"])
