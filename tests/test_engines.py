"""Inference runtimes: the ONNX export equals the torch network, `predict --engine` gives torch's labels through ONNX
Runtime and OpenVINO, and a bad engine or a missing runtime is a clear error."""

from __future__ import annotations

import importlib.util
import json
import sys
import zipfile

import numpy as np
import pytest
import torch

from autoseg.bundle import import_bundle
from autoseg.checkpoint import load_weights
from autoseg.cli import main
from autoseg.errors import AutosegError
from autoseg.inference.engines import checked_runtime_network, decide_engine, export_onnx, runtime_network
from autoseg.inference.predictor import Predictor
from autoseg.io.images import read_image, write_image
from autoseg.network import UNet, build_network
from autoseg.phantom import generate_case

from field_helpers import DATASET, tiny_model

ENGINES = [pytest.param(e, marks=pytest.mark.skipif(importlib.util.find_spec(e) is None,
                                                    reason=f"needs pip install 'autoseg[{x}]'"))
           for e, x in (("onnxruntime", "onnx"), ("openvino", "openvino"))]


def _unet(dims: int, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    strides = [[1] * dims, [2] * dims, [2] * dims]
    return UNet(dims, 2, 3, strides, [[3] * dims] * 3, [4, 8, 16], 2, "plain", False).eval()


@pytest.mark.parametrize("dims", [2, 3])
def test_onnx_export_round_trip_equals_torch_logits_on_other_shapes(dims):
    pytest.importorskip("onnxruntime", reason="needs pip install 'autoseg[onnx]'")
    import onnxruntime as ort

    net = _unet(dims)
    model = export_onnx(net, 2, [16] * dims)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    for shape in ((1, 2, *[16] * dims), (3, 2, *[24, 32, 40][3 - dims:])):  # batch and spatial axes are dynamic
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = net(x).numpy()
        out = session.run(None, {"image": x.numpy()})[0]
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("engine", ENGINES)
def test_runtime_network_is_called_like_the_torch_network(engine):
    net = _unet(3)
    runtime = runtime_network(engine, net, 2, [16, 16, 16])
    assert runtime.num_outputs == 3 and runtime is not net
    x = torch.randn((2, 2, 16, 16, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        np.testing.assert_allclose(runtime(x).numpy(), net(x).numpy(), atol=1e-4, rtol=0)
        flipped = torch.flip(x, [4])  # mirroring hands the runtime a flipped batch
        np.testing.assert_allclose(runtime(flipped).numpy(), net(flipped).numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_graph_that_disagrees_with_torch_is_refused(engine):
    other = export_onnx(_unet(3, seed=1), 2, [16, 16, 16])  # another network's weights
    with pytest.raises(AutosegError, match=f"the {engine} logits differ from torch's"):
        checked_runtime_network(engine, _unet(3, seed=0), 2, [16, 16, 16], where="fold_0", model=other)
    _, diff = checked_runtime_network(engine, _unet(3, seed=0), 2, [16, 16, 16])
    assert 0 < diff < 1e-4


def _case(tmp_path):
    image, _, geo = generate_case(5, "small")
    src = tmp_path / "in"
    write_image(src / "case_0000.nii.gz", image, geo)
    return src


@pytest.mark.parametrize("engine", ENGINES)
def test_predict_with_each_engine_gives_torchs_labels(roots, tmp_path, capsys, engine):
    ds = tiny_model(roots["AUTOSEG_RESULTS"])
    src = _case(tmp_path)
    segs = {}
    for e in ("torch", engine):
        out = tmp_path / e
        assert main(["predict", "-i", str(src), "-o", str(out), "-d", DATASET, "--device", "cpu",
                     "--engine", e]) == 0  # mirroring on: every flip goes through the runtime too
        assert f"3d_fullres: engine {e} (as asked" in capsys.readouterr().out
        segs[e] = read_image(out / "case.nii.gz")[0]
    assert len(np.unique(segs["torch"])) > 1  # a label map with structure, not all background
    differ = segs[engine] != segs["torch"]
    if differ.any():  # float32 kernels sum in another order: only a near-tie between two classes may flip
        image, geo = read_image(src / "case_0000.nii.gz")
        probs = np.sort(Predictor.from_trained(ds / "3d_fullres", device="cpu", precision="fp32")
                        .predict_array(image[None].astype(np.float32), geo), axis=0)
        margin = (probs[-1] - probs[-2])[differ]
        assert differ.mean() < 1e-3 and margin.max() < 1e-3, (differ.sum(), margin.max())


def test_bad_engine_is_a_usage_error(roots, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["predict", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "-d", DATASET, "--engine", "tensorrt"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--engine" in err and "'tensorrt'" in err and "onnxruntime" in err


@pytest.mark.parametrize("engine,extra", [("onnxruntime", "onnx"), ("openvino", "openvino")])
def test_a_missing_runtime_names_the_extra_to_install(roots, tmp_path, capsys, monkeypatch, engine, extra):
    tiny_model(roots["AUTOSEG_RESULTS"])
    monkeypatch.setitem(sys.modules, engine, None)  # import fails as if it were not installed
    assert main(["predict", "-i", str(_case(tmp_path)), "-o", str(tmp_path / "o"), "-d", DATASET,
                 "--engine", engine]) == 1
    err = capsys.readouterr().err
    assert f"--engine {engine} needs the package {engine}" in err and f"pip install 'autoseg[{extra}]'" in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_runtime_engines_refuse_a_torch_precision(roots, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="needs pip install 'autoseg[onnx]'")
    tiny_model(roots["AUTOSEG_RESULTS"])
    assert main(["predict", "-i", str(_case(tmp_path)), "-o", str(tmp_path / "o"), "-d", DATASET,
                 "--engine", "onnxruntime", "--precision", "bf16"]) == 1
    assert "--precision bf16 applies to --engine torch only" in capsys.readouterr().err


def test_export_onnx_packs_checked_graphs_that_import_and_run(roots, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="needs pip install 'autoseg[onnx]'")
    import onnxruntime as ort

    ds = tiny_model(roots["AUTOSEG_RESULTS"])
    bundle = tmp_path / "model.zip"
    assert main(["export", "-d", DATASET, "-o", str(bundle), "--onnx"]) == 0
    assert "3d_fullres/fold_0/checkpoint_final.onnx: ONNX opset 17, max |logit - torch|" in capsys.readouterr().out
    with zipfile.ZipFile(bundle) as zf:
        manifest = json.loads(zf.read(f"{DATASET}/manifest.json"))
    assert "3d_fullres/fold_0/checkpoint_final.onnx" in manifest["files"]
    assert manifest["onnx"]["opset"] == 17 and manifest["onnx"]["checked_with"].startswith("onnxruntime ")
    assert 0 <= manifest["onnx"]["max_abs_logit_diff"]["3d_fullres/fold_0/checkpoint_final.onnx"] < 1e-4

    folder = import_bundle(bundle, tmp_path / "imported")
    onnx_file = folder / "3d_fullres" / "fold_0" / "checkpoint_final.onnx"
    cfg = json.loads((ds / "3d_fullres" / "plans.json").read_text())["configurations"]["3d_fullres"]
    net = build_network(cfg, 1, 5)
    load_weights(ds / "3d_fullres" / "fold_0" / "checkpoint_final.safetensors", net)
    net.eval().deep_supervision = False
    x = torch.randn((1, 1, 24, 48, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = net(x).numpy()
    out = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_export_onnx_without_onnx_names_the_extra(roots, tmp_path, capsys, monkeypatch):
    tiny_model(roots["AUTOSEG_RESULTS"])
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main(["export", "-d", DATASET, "-o", str(tmp_path / "m.zip"), "--onnx"]) == 1
    assert "pip install 'autoseg[onnx]'" in capsys.readouterr().err
    assert not (tmp_path / "m.zip").exists()


def test_auto_takes_a_runtime_only_when_clearly_faster_than_torch():
    assert decide_engine({"torch": 1.0, "onnxruntime": 0.5, "openvino": 0.4})[0] == "openvino"
    engine, reason = decide_engine({"torch": 1.0, "onnxruntime": 0.9})
    assert engine == "torch" and "only 1.11x faster" in reason  # within timing noise
    assert decide_engine({"torch": 0.3, "onnxruntime": 0.5})[0] == "torch"
    assert decide_engine({"torch": 1.0})[0] == "torch"


def test_predict_engine_torch_is_the_default(roots, tmp_path, capsys):
    tiny_model(roots["AUTOSEG_RESULTS"])
    assert main(["predict", "-i", str(_case(tmp_path)), "-o", str(tmp_path / "o"), "-d", DATASET]) == 0
    assert "3d_fullres: engine torch (as asked)" in capsys.readouterr().out


def test_predict_auto_measures_the_engines_and_says_which_it_took(roots, tmp_path, capsys, monkeypatch):
    tiny_model(roots["AUTOSEG_RESULTS"])
    src = _case(tmp_path)
    assert main(["predict", "-i", str(src), "-o", str(tmp_path / "a"), "-d", DATASET, "--device", "cpu",
                 "--engine", "auto"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("3d_fullres: engine "))
    installed = [e for e in ("onnxruntime", "openvino") if importlib.util.find_spec(e)]
    if installed:
        assert "(auto: " in line and all(f"'{e}': " in line for e in ["torch", *installed])  # each was timed
    for engine in ("onnxruntime", "openvino"):  # without any runtime, auto is torch and says how to get one
        monkeypatch.setitem(sys.modules, engine, None)
    assert main(["predict", "-i", str(src), "-o", str(tmp_path / "b"), "-d", DATASET, "--device", "cpu",
                 "--engine", "auto"]) == 0
    out = capsys.readouterr().out
    assert "3d_fullres: engine torch (auto: no runtime installed; pip install 'autoseg[onnx]')" in out
    assert read_image(tmp_path / "b" / "case.nii.gz")[0].shape == read_image(tmp_path / "a" / "case.nii.gz")[0].shape
