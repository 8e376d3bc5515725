"""nnU-Net v2 models in (``autoseg import-nnunet``): a trained nnU-Net v2 results folder becomes an autoseg model.

An nnU-Net model folder (``nnUNet_results/DatasetNNN_Name/TRAINER__PLANS__CONFIGURATION``) holds ``plans.json``,
``dataset.json`` and ``fold_<k>/checkpoint_final.pth``. The conversion maps

- the configuration's architecture (dynamic_network_architectures' ``PlainConvUNet`` or ``ResidualEncoderUNet``,
  new ``architecture`` plans or the older ``UNet_class_name`` ones): stages, features, kernels, strides, convs or
  residual blocks per stage, decoder convs, conv bias, instance norm, LeakyReLU. Whatever autoseg's U-Net cannot
  compute exactly (batch norm, dropout, other activations, bottleneck blocks, squeeze-excitation, pooling
  encoders, the cascade's extra input channels, transposed axes) is refused by name;
- the preprocessing: spacing, patch, batch, CT (clip to the foreground 0.5/99.5 percentiles, z-score with the
  foreground mean and std) or per-image z-score normalisation, resampling orders;
- the weights: every tensor of the checkpoint's ``network_weights`` to its autoseg name (the aliases nnU-Net's
  modules register twice, ``*.all_modules.*`` and ``decoder.encoder.*``, must equal their twins), each shape
  checked, a missing conv bias (``conv_bias: false``) as zeros, which computes the same.

The checkpoint is a torch pickle. It is read with ``weights_only=True``, with only numpy's scalar and dtype
reconstructors allow-listed for that one call (nnU-Net keeps numpy scalars in its log and EMA); a checkpoint that
names any other global is refused before anything is unpickled. The model is written as
``<results>/<dataset>/<configuration>/`` (``plans.json``, ``dataset.json``, ``fold_<k>/checkpoint_final.safetensors``),
complete or not at all.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import write_json
from .checkpoint import fit_weights, save_checkpoint
from .errors import AutosegError
from .io.dataset import dataset_json_problems
from .jsonfile import read_json
from .labels import LabelSpec
from .layout import DATASET_JSON, PLANS_JSON, fold_dir, inside
from .network import UNet, build_network
from .planning.planner import SCHEMA_VERSION, estimate_memory_gb
from .schemas import validate
from .version import __version__

ARCHITECTURES = {"PlainConvUNet": "plain", "ResidualEncoderUNet": "residual"}
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")  # nnU-Net's names, kept as autoseg's
CHECKPOINTS = ("final", "best")
NORMALIZATIONS = {"CTNormalization": "ct", "ZScoreNormalization": "zscore"}
ANISOTROPY_THRESHOLD = 3.0  # nnU-Net's ANISO_THRESHOLD for separate-z resampling

_NUMPY_CORE = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
# the numpy types nnU-Net's checkpoints hold (scalars in the log and EMA); numpy 1 wrote them as numpy.core.*
# a numpy scalar is rebuilt from its dtype, whose class (Float64DType, ...) the unpickler must also accept
_SAFE_GLOBALS: list[Any] = [np.dtype, _NUMPY_CORE.multiarray.scalar,
                            *{type(np.dtype(code)) for code in ("f8", "f4", "f2", "i8", "i4", "i2", "i1", "u8", "u4",
                                                                "u2", "u1", "?")},
                            (_NUMPY_CORE.multiarray.scalar, "numpy.core.multiarray.scalar"),
                            (_NUMPY_CORE.multiarray.scalar, "numpy._core.multiarray.scalar")]
_SAFE_NAMES = {"numpy.dtype", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"}
_FOLD = re.compile(r"^fold_([0-9]{1,3}|all)$")


def _refuse(where: str, what: str) -> AutosegError:
    return AutosegError(f"{where}: {what}; autoseg cannot import this model (retrain it with autoseg, or with a "
                        "default nnU-Net v2 trainer and plans)")


def _int_list(value: Any, length: int | None, what: str, where: str) -> list[int]:
    ok = isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                                  for v in value)
    if not ok or (length is not None and len(value) != length):
        raise AutosegError(f"{where}: {what} must be a list of {length or 'some'} positive integers, found "
                           f"{str(value)[:120]}; the plans file is damaged")
    return [int(v) for v in value]


def _per_stage(value: Any, n: int, what: str, where: str) -> list[int]:
    """An int (every stage) or a list of ``n`` ints, as dynamic_network_architectures accepts."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value] * n
    return _int_list(value, n, what, where)


def _grid(value: Any, n: int, dims: int, what: str, where: str) -> list[list[int]]:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise AutosegError(f"{where}: {what} must list {n} stages, found {str(value)[:120]}")
    return [_per_stage(v, dims, what, where) for v in value]


def resolve_configuration(nn_plans: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    """The configuration ``name`` of nnU-Net plans with its ``inherits_from`` chain applied (child keys win)."""
    configs = nn_plans.get("configurations")
    if not isinstance(configs, dict):
        raise AutosegError(f"{where}: no 'configurations' object; not an nnU-Net v2 plans.json")
    chain: list[str] = []
    while name not in chain:
        if name not in configs or not isinstance(configs[name], dict):
            raise AutosegError(f"{where}: configuration {name!r} is not in the plans (planned: {sorted(configs)})")
        chain.append(name)
        parent = configs[name].get("inherits_from")
        if parent is None:
            break
        name = parent
    else:
        raise AutosegError(f"{where}: configurations inherit from each other in a circle ({' -> '.join(chain)})")
    merged: dict[str, Any] = {}
    for n in reversed(chain):
        merged.update(configs[n])
    return merged


def _architecture(cfg: dict[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """(network class name, its keyword arguments), from new (``architecture``) or older (``UNet_class_name``)
    plans, as nnU-Net v2 itself reads them."""
    if "architecture" in cfg:
        arch = cfg["architecture"]
        if not isinstance(arch, dict) or not isinstance(arch.get("arch_kwargs"), dict):
            raise AutosegError(f"{where}: 'architecture' lacks 'arch_kwargs'; the plans file is damaged")
        return str(arch.get("network_class_name", "")), dict(arch["arch_kwargs"])
    name = cfg.get("UNet_class_name")
    if name not in ARCHITECTURES:
        raise _refuse(where, f"network class {name!r} (UNet_class_name) is not one of {sorted(ARCHITECTURES)}")
    enc = cfg.get("n_conv_per_stage_encoder")
    n = len(enc) if isinstance(enc, list) else 0
    base, top = cfg.get("UNet_base_num_features"), cfg.get("unet_max_num_features")
    if not isinstance(base, int) or not isinstance(top, int) or n < 1:
        raise AutosegError(f"{where}: old-style plans lack UNet_base_num_features, unet_max_num_features or "
                           "n_conv_per_stage_encoder; the plans file is damaged")
    dims = len(cfg.get("patch_size", []))
    kwargs = {
        "n_stages": n, "features_per_stage": [min(base * 2 ** i, top) for i in range(n)],
        "conv_op": f"torch.nn.modules.conv.Conv{dims}d", "kernel_sizes": cfg.get("conv_kernel_sizes"),
        "strides": cfg.get("pool_op_kernel_sizes"),
        ("n_conv_per_stage" if name == "PlainConvUNet" else "n_blocks_per_stage"): enc,
        "n_conv_per_stage_decoder": cfg.get("n_conv_per_stage_decoder"), "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }
    return name, kwargs


def network_plan(cfg: dict[str, Any], where: str) -> tuple[dict[str, Any], bool]:
    """autoseg's ``network`` plan entry for an nnU-Net configuration, and whether its convs have biases; anything
    the autoseg U-Net would compute differently is refused by name."""
    class_name, kw = _architecture(cfg, where)
    short = class_name.rsplit(".", 1)[-1]
    if short not in ARCHITECTURES or not class_name.startswith(("dynamic_network_architectures.", short)):
        raise _refuse(where, f"network class {class_name!r} is not dynamic_network_architectures' "
                             f"{' or '.join(sorted(ARCHITECTURES))}")
    encoder = ARCHITECTURES[short]
    dims = len(cfg.get("patch_size") or [])
    if dims not in (2, 3):
        raise AutosegError(f"{where}: patch_size {cfg.get('patch_size')} is neither 2D nor 3D")
    expect = {
        "conv_op": {f"torch.nn.modules.conv.Conv{dims}d", f"torch.nn.Conv{dims}d"},
        "norm_op": {f"torch.nn.modules.instancenorm.InstanceNorm{dims}d", f"torch.nn.InstanceNorm{dims}d"},
        "nonlin": {"torch.nn.LeakyReLU", "torch.nn.modules.activation.LeakyReLU"},
    }
    for key, allowed in expect.items():
        if kw.get(key) not in allowed:
            raise _refuse(where, f"arch_kwargs {key} is {kw.get(key)!r}, autoseg's U-Net has only {sorted(allowed)[0]}")
    norm_kw = kw.get("norm_op_kwargs") or {}
    if norm_kw.get("affine", False) is not True or norm_kw.get("eps", 1e-5) != 1e-5 or \
            norm_kw.get("track_running_stats", False) or set(norm_kw) - {"eps", "affine", "momentum"}:
        raise _refuse(where, f"norm_op_kwargs {norm_kw} are not affine instance norm with eps 1e-5")
    nonlin_kw = kw.get("nonlin_kwargs") or {}
    if nonlin_kw.get("negative_slope", 0.01) != 0.01 or set(nonlin_kw) - {"inplace", "negative_slope"}:
        raise _refuse(where, f"nonlin_kwargs {nonlin_kw}: autoseg's LeakyReLU has negative slope 0.01")
    if kw.get("dropout_op") is not None:
        raise _refuse(where, f"dropout_op {kw['dropout_op']!r} (autoseg's U-Net has no dropout)")
    unsupported = {"nonlin_first": False, "pool": "conv", "pool_type": "conv", "block": None,
                   "bottleneck_channels": None, "stochastic_depth_p": 0.0, "squeeze_excitation": False}
    for key, default in unsupported.items():
        value = kw.get(key, default)
        if key == "block" and value is not None and str(value).rsplit(".", 1)[-1] == "BasicBlockD":
            continue
        if value != default:
            raise _refuse(where, f"arch_kwargs {key} = {value!r} is not supported (autoseg: {default!r})")
    n = kw.get("n_stages")
    if not isinstance(n, int) or n < 2:
        raise AutosegError(f"{where}: n_stages {n!r} must be an integer >= 2")
    features = _per_stage(kw.get("features_per_stage"), n, "features_per_stage", where)
    stem = encoder == "residual"
    if stem and kw.get("stem_channels") not in (None, features[0]):
        raise _refuse(where, f"stem_channels {kw['stem_channels']} differ from the first stage's {features[0]}")
    enc = _per_stage(kw.get("n_conv_per_stage" if encoder == "plain" else "n_blocks_per_stage"), n,
                     "convs/blocks per stage", where)
    dec = _per_stage(kw.get("n_conv_per_stage_decoder"), n - 1, "n_conv_per_stage_decoder", where)
    kernels = _grid(kw.get("kernel_sizes"), n, dims, "kernel_sizes", where)
    if any(k % 2 == 0 for row in kernels for k in row):
        raise _refuse(where, f"kernel_sizes {kernels} hold an even size (autoseg pads odd kernels only)")
    strides = _grid(kw.get("strides"), n, dims, "strides", where)
    conv_bias = kw.get("conv_bias", False)
    if not isinstance(conv_bias, bool):
        raise AutosegError(f"{where}: conv_bias {conv_bias!r} must be true or false")
    net: dict[str, Any] = {"encoder": encoder, "strides": strides, "kernel_sizes": kernels, "features": features,
                           "convs_per_stage": enc[0], "deep_supervision": True}
    if enc != [enc[0]] * n or dec != [enc[0]] * (n - 1):
        net.update(encoder_convs=enc, decoder_convs=dec)
    if stem:
        net["stem"] = True
    return net, conv_bias


def _normalization(nn_plans: dict[str, Any], cfg: dict[str, Any], channels: int, where: str) -> list[dict[str, Any]]:
    schemes, masks = cfg.get("normalization_schemes"), cfg.get("use_mask_for_norm") or [False] * channels
    if not isinstance(schemes, list) or len(schemes) != channels:
        raise AutosegError(f"{where}: normalization_schemes {schemes} do not list the {channels} channel(s) of "
                           "dataset.json")
    props = nn_plans.get("foreground_intensity_properties_per_channel") or \
        nn_plans.get("foreground_intensity_properties_by_modality") or {}
    out = []
    for c, (scheme, mask) in enumerate(zip(schemes, masks)):
        if scheme not in NORMALIZATIONS:
            raise _refuse(where, f"channel {c} uses {scheme} (autoseg has {' and '.join(NORMALIZATIONS)})")
        if mask:
            raise _refuse(where, f"channel {c} normalises inside the nonzero mask only (use_mask_for_norm); "
                                 "autoseg normalises the whole cropped image")
        entry: dict[str, Any] = {"channel": c, "scheme": NORMALIZATIONS[scheme]}
        if scheme == "CTNormalization":
            p = props.get(str(c), {})
            try:
                entry.update(clip=[float(p["percentile_00_5"]), float(p["percentile_99_5"])], mean=float(p["mean"]),
                             std=float(p["std"]))
            except (KeyError, TypeError, ValueError):
                raise AutosegError(f"{where}: CT normalisation of channel {c} needs foreground_intensity_properties"
                                   f"_per_channel[\"{c}\"] with percentile_00_5, percentile_99_5, mean and std") from None
        out.append(entry)
    return out


def _resampling(cfg: dict[str, Any]) -> dict[str, Any]:
    data, seg = cfg.get("resampling_fn_data_kwargs") or {}, cfg.get("resampling_fn_seg_kwargs") or {}
    return {"image_order": data.get("order", 3), "label_order": seg.get("order", 1),
            "out_of_plane_order": data.get("order_z", 0), "anisotropy_threshold": ANISOTROPY_THRESHOLD}


def configuration_plan(nn_plans: dict[str, Any], name: str, in_channels: int, n_out: int, where: str
                       ) -> tuple[dict[str, Any], bool]:
    """One autoseg configuration entry (and the conv bias flag) from nnU-Net's configuration ``name``."""
    if name not in CONFIGURATIONS:
        why = (" (nnU-Net's cascade feeds the low-resolution segmentation to the network as extra input channels; "
               "autoseg's 3d_cascade predicts 3d_fullres inside organ boxes instead)" if "cascade" in name else "")
        raise _refuse(where, f"configuration {name!r} is not one of {', '.join(CONFIGURATIONS)}{why}")
    cfg = resolve_configuration(nn_plans, name, where)
    net, conv_bias = network_plan(cfg, where)
    dims = len(net["strides"][0])
    patch = _int_list(cfg.get("patch_size"), dims, "patch_size", where)
    spacing, median = cfg.get("spacing"), cfg.get("median_image_size_in_voxels")
    notes = [f"imported from nnU-Net v2 configuration {name} ({'ResEnc' if net['encoder'] == 'residual' else 'plain'}"
             f" U-Net, {len(net['features'])} stages, conv bias {conv_bias})"]
    if dims == 2:  # nnU-Net's 2d keeps each case's slice spacing; autoseg's plans name one, the dataset median
        spacing = [nn_plans.get("original_median_spacing_after_transp", [1.0])[0]] + list(spacing or [])
        median = [nn_plans.get("original_median_shape_after_transp", [1])[0]] + list(median or [])
        notes.append(f"2d: slices resampled to the dataset's median slice spacing {spacing[0]} mm (nnU-Net keeps each "
                     "case's own)")
    batch = cfg.get("batch_size", 2)
    config = {
        "dims": dims, "data_identifier": str(cfg.get("data_identifier", name)), "spacing": spacing,
        "median_shape": median, "patch_size": patch, "batch_size": batch, "network": net,
        "estimated_memory_gb": estimate_memory_gb(patch, int(batch) if isinstance(batch, int) else 2, net,
                                                  in_channels, n_out),
        "resampling": _resampling(cfg), "notes": notes,
    }
    return config, conv_bias


def convert_plans(nn_plans: dict[str, Any], meta: dict[str, Any], configuration: str, where: str) -> tuple[dict, bool]:
    """autoseg plans (schema-checked) holding ``configuration`` and every other nnU-Net configuration that maps,
    and the imported configuration's conv bias flag."""
    if list(nn_plans.get("transpose_forward", [0, 1, 2])) != [0, 1, 2]:
        raise _refuse(where, f"transpose_forward {nn_plans['transpose_forward']}: the network works on transposed "
                             "axes, autoseg's on (z, y, x)")
    in_channels = len(meta["channel_names"])
    n_out = LabelSpec.from_meta(meta).layout()[0]
    configs, conv_bias = {}, False
    for name in CONFIGURATIONS:
        if name == configuration:
            configs[name], conv_bias = configuration_plan(nn_plans, name, in_channels, n_out, where)
        elif name in nn_plans.get("configurations", {}):
            try:
                configs[name] = configuration_plan(nn_plans, name, in_channels, n_out, where)[0]
            except AutosegError:
                continue  # another configuration that does not map: only the imported one must
    if configuration not in configs:
        configs[configuration] = configuration_plan(nn_plans, configuration, in_channels, n_out, where)[0]
    first = configs[configuration]
    plans = {
        "schema_version": SCHEMA_VERSION, "autoseg_version": __version__,
        "dataset_name": str(nn_plans.get("dataset_name", "")), "channel_names": dict(meta["channel_names"]),
        "labels": dict(meta["labels"]), "device": "gpu", "gpu_memory_gb": 8.0,
        "normalization": _normalization(nn_plans, resolve_configuration(nn_plans, configuration, where),
                                        in_channels, where),
        "configurations": configs,
        "notes": [f"imported from nnU-Net v2 plans {nn_plans.get('plans_name', '?')} "
                  f"({nn_plans.get('experiment_planner_used', '?')}) by autoseg import-nnunet; gpu_memory_gb is "
                  "nnU-Net's default planning target, not read from the plans"] + first["notes"],
    }
    if "regions_class_order" in meta:
        plans["regions_class_order"] = list(meta["regions_class_order"])
    validate(plans, "plans", where, "the nnU-Net plans hold values autoseg does not accept")
    return plans, conv_bias


# ------------------------------------------------------------------------------------------------------- weights


def read_checkpoint(path: Path) -> dict[str, Any]:
    """An nnU-Net checkpoint read with ``weights_only=True`` and numpy's scalar and dtype allow-listed for this one
    call; any other global in the pickle is refused by name before anything is unpickled."""
    if not hasattr(torch.serialization, "safe_globals"):
        raise AutosegError(f"{path}: reading nnU-Net checkpoints safely needs torch >= 2.5 (this is {torch.__version__}); "
                           "upgrade torch")
    try:
        named = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception as e:  # not a zip, truncated, not a torch file
        raise AutosegError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    refused = sorted(named - _SAFE_NAMES)
    if refused:
        raise AutosegError(f"{path}: the checkpoint pickles {', '.join(refused)}; autoseg unpickles only tensors, "
                           f"builtins and {', '.join(sorted(_SAFE_NAMES))} (what nnU-Net v2's trainer stores), so it "
                           "refuses this file. Save the network's state_dict alone (torch.save(ckpt['network_weights'])"
                           ", in a trusted environment) into a checkpoint with the nnU-Net keys")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise AutosegError(f"{path}: could not be read with weights_only=True ({type(e).__name__}: "
                           f"{str(e)[:200]})") from None
    weights = ckpt.get("network_weights") if isinstance(ckpt, dict) else None
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise AutosegError(f"{path}: no 'network_weights' of tensors; not an nnU-Net v2 checkpoint")
    return ckpt


def _name_pairs(net: dict[str, Any]) -> dict[str, str]:
    """autoseg module name -> nnU-Net module name, for every module with parameters."""
    n, residual = len(net["features"]), net["encoder"] == "residual"
    enc = net.get("encoder_convs", [net["convs_per_stage"]] * n)
    dec = net.get("decoder_convs", [net["convs_per_stage"]] * (n - 1))
    pairs: dict[str, str] = {}

    def conv_norm(ours: str, theirs: str) -> None:  # our Sequential(conv, norm[, act]) is their ConvDropoutNormReLU
        pairs[f"{ours}.0"], pairs[f"{ours}.1"] = f"{theirs}.conv", f"{theirs}.norm"

    if net.get("stem"):
        conv_norm("stem", "encoder.stem.convs.0")
    for s in range(n):
        for i in range(enc[s]):
            ours = f"encoder.{s}.{i}"
            if not residual:
                conv_norm(ours, f"encoder.stages.{s}.0.convs.{i}")
                continue
            theirs = f"encoder.stages.{s}.blocks.{i}"
            conv_norm(f"{ours}.conv1", f"{theirs}.conv1")
            conv_norm(f"{ours}.conv2", f"{theirs}.conv2")
            p = int(i == 0 and any(v != 1 for v in net["strides"][s]))  # both skips: [avg pool], 1x1 conv, norm
            pairs[f"{ours}.skip.{p}"], pairs[f"{ours}.skip.{p + 1}"] = f"{theirs}.skip.{p}.conv", f"{theirs}.skip.{p}.norm"
    for s in range(n - 1):  # nnU-Net counts decoder stages from the bottleneck up
        k = n - 2 - s
        pairs[f"decoder.{s}.up"] = f"decoder.transpconvs.{k}"
        for i in range(dec[s]):
            conv_norm(f"decoder.{s}.convs.{i}", f"decoder.stages.{k}.convs.{i}")
        pairs[f"heads.{s}"] = f"decoder.seg_layers.{k}"
    return pairs


def _canonical(weights: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """nnU-Net's state_dict without its aliases (``X.all_modules.0`` is ``X.conv``, ``.1`` is ``X.norm``;
    ``decoder.encoder.*`` is ``encoder.*``), each alias checked to equal its twin."""
    out = {}
    for key, value in weights.items():
        twin = re.sub(r"\.all_modules\.0\.", ".conv.", key)
        twin = re.sub(r"\.all_modules\.1\.", ".norm.", twin)
        twin = twin.removeprefix("decoder.") if twin.startswith("decoder.encoder.") else twin
        if twin == key:
            out[key] = value
        elif twin not in weights or weights[twin].shape != value.shape or not torch.equal(weights[twin], value):
            raise AutosegError(f"{where}: {key} does not equal {twin}, which nnU-Net registers as the same tensor; "
                               "the checkpoint was edited or comes from another network class")
    return out


def convert_weights(weights: dict[str, torch.Tensor], net: dict[str, Any], conv_bias: bool, model: UNet,
                    where: str) -> dict[str, torch.Tensor]:
    """nnU-Net ``network_weights`` renamed to ``model``'s state_dict names, every tensor accounted for."""
    theirs = _canonical(weights, where)
    pairs = _name_pairs(net)
    out, missing = {}, []
    for key, ref in model.state_dict().items():
        module, _, param = key.rpartition(".")
        source = f"{pairs.get(module, '?' + module)}.{param}"
        if source in theirs:
            out[key] = theirs.pop(source).float()
        elif param == "bias" and not conv_bias and ".norm" not in source and "seg_layers" not in source:
            out[key] = torch.zeros_like(ref)  # conv_bias false: the same function as a zero bias
        else:
            missing.append(source)
    if missing or theirs:
        raise _refuse(where, f"its weights do not match the network its plans describe (missing {missing[:3]}, "
                             f"not part of the planned network {sorted(theirs)[:3]}; {len(missing)} and {len(theirs)} "
                             "in all): the trainer built another network than the plans say")
    return out


# ------------------------------------------------------------------------------------------------------- folders


@dataclass
class ImportedModel:
    """A converted nnU-Net model in memory: autoseg plans, dataset.json and weights per fold."""

    plans: dict[str, Any]
    meta: dict[str, Any]
    configuration: str
    folds: dict[str, UNet]
    notes: list[str]


def _fold_checkpoints(folder: Path, checkpoint: str, folds: list[str] | None) -> dict[str, Path]:
    found = {m.group(1): p / f"checkpoint_{checkpoint}.pth" for p in sorted(folder.iterdir())
             if p.is_dir() and (m := _FOLD.match(p.name)) and (p / f"checkpoint_{checkpoint}.pth").is_file()}
    chosen = folds or sorted(found)
    missing = [f for f in chosen if f not in found]
    if missing or not chosen:
        raise AutosegError(f"{folder}: no fold_<k>/checkpoint_{checkpoint}.pth for fold(s) {missing or 'any'} "
                           f"(found: {sorted(found) or 'none'}); give the trainer folder that holds fold_0 ... (e.g. "
                           "nnUNet_results/Dataset501_X/nnUNetTrainer__nnUNetPlans__3d_fullres) or other -f folds")
    return {f: found[f] for f in chosen}


def convert_model(folder: Path, configuration: str | None = None, folds: list[str] | None = None,
                  checkpoint: str = "final") -> ImportedModel:
    """Read and convert an nnU-Net v2 trainer folder (nothing is written). ``configuration`` defaults to the
    folder name's last ``__`` part (``nnUNetTrainer__nnUNetPlans__3d_fullres``)."""
    folder = Path(folder)
    if checkpoint not in CHECKPOINTS:
        raise AutosegError(f"--checkpoint {checkpoint!r} is not one of {', '.join(CHECKPOINTS)}")
    if not (folder / PLANS_JSON).is_file() or not (folder / DATASET_JSON).is_file():
        raise AutosegError(f"{folder}: no plans.json and dataset.json; give an nnU-Net v2 trainer folder such as "
                           "nnUNet_results/Dataset501_X/nnUNetTrainer__nnUNetPlans__3d_fullres")
    nn_plans = read_json(folder / PLANS_JSON, "copy plans.json again from the nnU-Net results folder")
    meta = read_json(folder / DATASET_JSON, "copy dataset.json again from the nnU-Net results folder")
    problems = dataset_json_problems(meta, str(folder / DATASET_JSON))
    if problems or not isinstance(nn_plans, dict):
        raise AutosegError("; ".join(problems) or f"{folder / PLANS_JSON}: top level must be an object")
    configuration = configuration or folder.name.rsplit("__", 1)[-1]
    where = f"{folder / PLANS_JSON} ({configuration})"
    plans, conv_bias = convert_plans(nn_plans, meta, configuration, where)
    config = plans["configurations"][configuration]
    n_out = LabelSpec.from_meta(meta).layout()[0]
    models, notes = {}, []
    for fold, path in _fold_checkpoints(folder, checkpoint, folds).items():
        ckpt = read_checkpoint(path)
        init_args = ckpt.get("init_args")
        trained = init_args.get("configuration") if isinstance(init_args, dict) else None
        if trained is not None and trained != configuration:
            raise AutosegError(f"{path}: trained as configuration {trained!r}, not {configuration!r}; pass -c {trained}")
        model = build_network(config, len(meta["channel_names"]), n_out)
        fit_weights(model, convert_weights(ckpt["network_weights"], config["network"], conv_bias, model, str(path)),
                    path)
        models[fold] = model.eval()
        notes.append(f"fold {fold}: {path.name} of {ckpt.get('trainer_name', '?')}, epoch "
                     f"{ckpt.get('current_epoch', '?')}, mirroring axes at inference "
                     f"{ckpt.get('inference_allowed_mirroring_axes', '?')}")
    plans["notes"] += notes
    return ImportedModel(plans, meta, configuration, models, notes)


def import_nnunet(folder: Path, results_root: Path, configuration: str | None = None,
                  folds: list[str] | None = None, checkpoint: str = "final", overwrite: bool = False) -> Path:
    """Convert an nnU-Net v2 trainer folder into ``results_root/<dataset>/<configuration>``; returns that folder.

    The model is written to a temporary folder beside it and renamed into place, so it is there complete or not
    at all; an existing folder is an error unless ``overwrite``.
    """
    model = convert_model(folder, configuration, folds, checkpoint)
    dataset_dir = inside(Path(results_root), model.plans["dataset_name"], f"{folder / PLANS_JSON} dataset_name")
    target = dataset_dir / model.configuration
    if target.exists() and not overwrite:
        raise AutosegError(f"{target} already exists; pass --overwrite to replace it")
    dataset_dir.mkdir(parents=True, exist_ok=True)
    tmp = dataset_dir / f".autoseg-import-{uuid.uuid4().hex[:8]}-{model.configuration}"
    try:
        tmp.mkdir()
        write_json(tmp / PLANS_JSON, model.plans)
        write_json(tmp / DATASET_JSON, model.meta)
        for fold, net in model.folds.items():
            fold_dir(tmp, fold).mkdir()
            save_checkpoint(fold_dir(tmp, fold), "final", net)
        if target.exists():
            aside = dataset_dir / f".autoseg-old-{uuid.uuid4().hex[:8]}-{model.configuration}"
            os.rename(target, aside)
            os.rename(tmp, target)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
