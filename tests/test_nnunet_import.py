"""``autoseg import-nnunet``: nnU-Net v2 model folders (built here with nnU-Net's key names, shapes, aliases and
checkpoint metadata; see nnunet_helpers) become autoseg models whose logits equal an independent functional
forward over the original state_dict; what cannot be represented or unpickled safely is refused by name."""

import copy
import json
from pathlib import Path

import pytest
import torch

from autoseg.cli import main
from autoseg.errors import AutosegError
from autoseg.inference.predictor import Predictor
from autoseg.jsonfile import read_json
from autoseg.nnunet import convert_model, import_nnunet

from nnunet_helpers import META, arch_kwargs, nnunet_plans, old_style, reference_logits, state_dict, write_model

N_OUT = 3  # background, liver, liver_tumor


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _logits_match(kind: str, dims: int, plans: dict, tmp_path: Path, kw: dict | None = None) -> float:
    config = "2d" if dims == 2 else "3d_fullres"
    kw = kw or _arch(plans, "2d" if dims == 2 else "3d_fullres")
    sd = state_dict(kind, kw, 1, N_OUT, seed=dims)
    folder = write_model(tmp_path / "nnUNet_results", plans, config, {0: sd})
    target = import_nnunet(folder, tmp_path / "results")
    assert target == tmp_path / "results" / "Dataset777_NNPhantom" / config
    # the imported folder is a regular autoseg model: the predictor loads it from the files written
    net = Predictor.from_trained(target, device="cpu", precision="fp32").models[0]
    shape = (1, 1, 16, 32, 32) if dims == 3 else (2, 1, 32, 32)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = net(x)
        ref = reference_logits(kind, kw, sd, x)
    assert ours.shape == ref.shape == (shape[0], N_OUT, *shape[2:])
    assert float(ref.abs().max()) > 0.1  # a real signal, not all zeros
    return float((ours - ref).abs().max())


@pytest.mark.parametrize("kind,dims", [("plain", 3), ("plain", 2), ("res", 3), ("res", 2)])
def test_converted_logits_equal_the_reference(kind, dims, tmp_path):
    assert _logits_match(kind, dims, nnunet_plans(kind, dims), tmp_path) < 1e-4


def test_conv_without_bias_and_old_style_plans(tmp_path):
    assert _logits_match("res", 3, nnunet_plans("res", 3, conv_bias=False), tmp_path / "a") < 1e-4
    plans = nnunet_plans("plain", 3)
    _arch(plans)["features_per_stage"] = [4, 8, 16, 16]  # what base and max features can say: doubling, capped
    kw = copy.deepcopy(_arch(plans))
    assert _logits_match("plain", 3, old_style(plans, "3d_fullres"), tmp_path / "b", kw) < 1e-4


def test_plans_mapping(tmp_path):
    sd = state_dict("res", arch_kwargs("res", 3), 1, N_OUT)
    folder = write_model(tmp_path, nnunet_plans("res", 3), "3d_fullres", {0: sd, "all": sd})
    target = import_nnunet(folder, tmp_path / "results", folds=["all"])
    plans = read_json(target / "plans.json", "", "plans")
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["spacing"] == [2.5, 0.8, 0.8] and cfg["patch_size"] == [16, 32, 32] and cfg["batch_size"] == 2
    assert cfg["network"] == {"encoder": "residual", "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
                              "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]], "features": [4, 8, 12, 16],
                              "convs_per_stage": 1, "encoder_convs": [1, 2, 3, 2], "decoder_convs": [1, 1, 1],
                              "stem": True, "deep_supervision": True}
    assert cfg["resampling"] == {"image_order": 3, "label_order": 1, "out_of_plane_order": 0,
                                 "anisotropy_threshold": 3.0}
    assert plans["normalization"] == [{"channel": 0, "scheme": "ct", "clip": [-150.25, 250.75], "mean": 80.5,
                                       "std": 42.5}]
    assert plans["configurations"]["2d"]["spacing"] == [2.5, 0.8, 0.8]  # 2d: the median slice spacing in front
    assert sorted(p.name for p in target.iterdir()) == ["dataset.json", "fold_all", "plans.json"]
    assert json.loads((target / "dataset.json").read_text()) == META
    assert any("nnUNetTrainer" in n and "(0, 1, 2)" in n for n in plans["notes"])


class Evil:
    """Not something a checkpoint may make autoseg construct."""


def test_a_checkpoint_with_another_global_is_refused(tmp_path):
    sd = state_dict("plain", arch_kwargs("plain", 3), 1, N_OUT)
    folder = write_model(tmp_path, nnunet_plans("plain", 3), "3d_fullres", {0: sd}, payload=Evil())
    with pytest.raises(AutosegError, match=r"checkpoint pickles .*Evil.*refuses this file"):
        import_nnunet(folder, tmp_path / "results")
    assert not (tmp_path / "results" / "Dataset777_NNPhantom" / "3d_fullres").exists()
    # numpy arrays are not among what nnU-Net's trainer stores either
    import numpy as np

    folder2 = write_model(tmp_path / "b", nnunet_plans("plain", 3), "3d_fullres", {0: sd}, extra=np.zeros(3))
    with pytest.raises(AutosegError, match=r"numpy\._core\.multiarray\._reconstruct"):
        import_nnunet(folder2, tmp_path / "results")


def _arch(plans: dict, config: str = "3d_fullres") -> dict:
    return plans["configurations"][config]["architecture"]["arch_kwargs"]


@pytest.mark.parametrize("change,message", [
    (lambda p: _arch(p).update(norm_op="torch.nn.modules.batchnorm.BatchNorm3d"), r"norm_op is .*BatchNorm3d"),
    (lambda p: _arch(p).update(dropout_op="torch.nn.modules.dropout.Dropout3d"), r"dropout_op .*no dropout"),
    (lambda p: _arch(p).update(nonlin="torch.nn.ReLU"), r"nonlin is 'torch.nn.ReLU'"),
    (lambda p: p["configurations"]["3d_fullres"]["architecture"].update(
        network_class_name="dynamic_network_architectures.architectures.unet.ResidualUNet"), r"ResidualUNet"),
    (lambda p: p["configurations"]["3d_fullres"].update(normalization_schemes=["RescaleTo01Normalization"]),
     r"RescaleTo01Normalization"),
    (lambda p: p.update(transpose_forward=[2, 1, 0]), r"transpose_forward"),
])
def test_what_the_unet_cannot_represent_is_refused(change, message, tmp_path):
    plans = nnunet_plans("plain", 3)
    sd = state_dict("plain", arch_kwargs("plain", 3), 1, N_OUT)
    change(plans)
    folder = write_model(tmp_path, plans, "3d_fullres", {0: sd})
    with pytest.raises(AutosegError, match=message):
        convert_model(folder)


def test_cascade_and_mismatching_weights_are_refused(tmp_path):
    plans = nnunet_plans("plain", 3)
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    sd = state_dict("plain", arch_kwargs("plain", 3), 1, N_OUT)
    folder = write_model(tmp_path / "a", plans, "3d_cascade_fullres", {0: sd})
    with pytest.raises(AutosegError, match=r"3d_cascade_fullres.*extra input channels"):
        convert_model(folder)
    # a trainer that built another network than its plans say (here: BatchNorm running statistics)
    bad = dict(sd, **{"encoder.stages.0.0.convs.0.norm.running_mean": torch.zeros(4)})
    folder = write_model(tmp_path / "b", nnunet_plans("plain", 3), "3d_fullres", {0: bad})
    with pytest.raises(AutosegError, match=r"not part of the planned network \['encoder.stages.0.0.convs.0.norm"
                                           r".running_mean'\]"):
        convert_model(folder)
    # an alias that differs from its twin
    edited = dict(sd)
    edited["decoder.encoder.stages.0.0.convs.0.conv.weight"] = sd["encoder.stages.0.0.convs.0.conv.weight"] + 1
    folder = write_model(tmp_path / "c", nnunet_plans("plain", 3), "3d_fullres", {0: edited})
    with pytest.raises(AutosegError, match=r"does not equal encoder.stages.0.0.convs.0.conv.weight"):
        convert_model(folder)


def test_cli(tmp_path, monkeypatch, capsys):
    sd = state_dict("plain", arch_kwargs("plain", 3), 1, N_OUT)
    folder = write_model(tmp_path, nnunet_plans("plain", 3), "3d_fullres", {0: sd, 1: sd})
    monkeypatch.setenv("AUTOSEG_RESULTS", str(tmp_path / "results"))
    assert main(["import-nnunet", str(folder), "-f", "1"]) == 0
    assert "fold_1" in {p.name for p in (tmp_path / "results" / "Dataset777_NNPhantom" / "3d_fullres").iterdir()}
    assert main(["import-nnunet", str(folder)]) == 1  # exists: needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["import-nnunet", str(folder), "--overwrite"]) == 0
    assert main(["import-nnunet", str(tmp_path)]) == 1
    assert "no plans.json and dataset.json" in capsys.readouterr().err
