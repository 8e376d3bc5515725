"""``train --init-from MODEL``: tensors that fit are loaded, the others keep their initialisation and are listed,
networks of another structure are refused with the differences; sources: results folders, bundles, nnU-Net folders."""

import copy
import json
from pathlib import Path

import pytest
import torch

from autoseg.bundle import export_bundle
from autoseg.checkpoint import InitSource, init_from, save_checkpoint
from autoseg.cli import main
from autoseg.errors import AutosegError
from autoseg.network import build_network
from autoseg.transfer import init_source

from nnunet_helpers import arch_kwargs, nnunet_plans, state_dict, write_model
from test_trainer import NAME, env_of, prepare

REPO = Path(__file__).resolve().parents[1]
NET = {"encoder": "plain", "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]], "kernel_sizes": [[1, 3, 3], [3, 3, 3],
       [3, 3, 3]], "features": [4, 8, 16], "convs_per_stage": 2, "deep_supervision": True}


def _plans(net: dict, dims: int = 3) -> dict:
    plans = json.loads((REPO / "plans" / "demo_phantom.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    cfg["network"] = copy.deepcopy(net)
    cfg["dims"] = dims
    cfg["patch_size"] = [32, 32] if dims == 2 else [16, 32, 32]
    return plans


def _source(root: Path, net: dict, in_channels: int, n_out: int, fold: str = "all", seed: int = 1) -> Path:
    """An autoseg results dataset folder with one trained fold of ``net``."""
    plans = _plans(net)
    config_dir = root / NAME / "3d_fullres"
    (config_dir / f"fold_{fold}").mkdir(parents=True)
    (config_dir / "plans.json").write_text(json.dumps(plans))
    meta = {"channel_names": {str(i): "CT" for i in range(in_channels)}, "labels": {"background": 0, **{
        f"l{i}": i for i in range(1, n_out)}}, "numTraining": 2, "file_ending": ".nii.gz"}
    (config_dir / "dataset.json").write_text(json.dumps(meta))
    torch.manual_seed(seed)
    save_checkpoint(config_dir / f"fold_{fold}", "final", build_network(plans["configurations"]["3d_fullres"],
                                                                           in_channels, n_out))
    return root / NAME


def test_matching_tensors_load_and_the_rest_is_listed(tmp_path):
    source = init_source(_source(tmp_path, NET, in_channels=1, n_out=3), "3d_fullres")
    assert source.where.endswith("(3d_fullres, fold all)")
    config = _plans(NET)["configurations"]["3d_fullres"]
    torch.manual_seed(0)
    model = build_network(config, 2, 5)  # another number of channels and of labels
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = init_from(model, config, source)
    after = model.state_dict()
    kept = {line.split()[0] for line in report["initialised"]}
    assert kept == {"encoder.0.0.0.weight"} | {f"heads.{s}.{p}" for s in (0, 1) for p in ("weight", "bias")}
    assert report["loaded"] == len(after) - len(kept)
    assert "encoder.0.0.0.weight (4, 2, 1, 3, 3) (source: (4, 1, 1, 3, 3))" in report["initialised"]
    for key, value in after.items():
        expected = before[key] if key in kept else source.weights[key]
        assert torch.equal(value, expected), key
    assert not torch.equal(after["decoder.0.up.weight"], before["decoder.0.up.weight"])


@pytest.mark.parametrize("change,message", [
    (lambda n: n.update(strides=n["strides"] + [[2, 2, 2]], kernel_sizes=n["kernel_sizes"] + [[3, 3, 3]],
                        features=n["features"] + [32]), r"stages 4 \(this configuration: 3\)"),
    (lambda n: n.update(features=[8, 16, 32]), r"features \[8, 16, 32\] \(this configuration: \[4, 8, 16\]\)"),
    (lambda n: n.update(encoder="residual"), r"encoder residual \(this configuration: plain\)"),
    (lambda n: n.update(kernel_sizes=[[3, 3, 3]] * 3), r"kernel_sizes"),
])
def test_incompatible_networks_are_refused(change, message, tmp_path):
    other = copy.deepcopy(NET)
    change(other)
    source = init_source(_source(tmp_path, other, 1, 3), "3d_fullres")
    config = _plans(NET)["configurations"]["3d_fullres"]
    with pytest.raises(AutosegError, match=r"--init-from .*its network does not fit this configuration's .*" + message):
        init_from(build_network(config, 1, 3), config, source)


def test_other_dims_are_refused():
    net2d = {**NET, "strides": [[1, 1], [2, 2], [2, 2]], "kernel_sizes": [[3, 3]] * 3}
    config2d = _plans(net2d, dims=2)["configurations"]["3d_fullres"]
    config = _plans(NET)["configurations"]["3d_fullres"]
    source = InitSource(config2d, build_network(config2d, 1, 3).state_dict(), "model")
    with pytest.raises(AutosegError, match=r"dims 2 \(this configuration: 3\)"):
        init_from(build_network(config, 1, 3), config, source)


def test_sources_bundle_fold_and_nnunet_folder(tmp_path):
    dataset = _source(tmp_path / "results", NET, 1, 3, fold="0")
    zipped = export_bundle(dataset, tmp_path / "model.zip")
    from_zip = init_source(zipped, "3d_fullres")
    from_fold = init_source(dataset / "3d_fullres" / "fold_0", "2d")
    assert from_zip.weights.keys() == from_fold.weights.keys()
    assert all(torch.equal(from_zip.weights[k], from_fold.weights[k]) for k in from_zip.weights)
    with pytest.raises(AutosegError, match="no such file"):
        init_source(tmp_path / "absent", "3d_fullres")
    # an nnU-Net trainer folder is converted in memory: its weights arrive under autoseg's names
    sd = state_dict("res", arch_kwargs("res", 3), 1, 3)
    folder = write_model(tmp_path / "nnUNet_results", nnunet_plans("res", 3), "3d_fullres", {0: sd})
    source = init_source(folder, "3d_fullres")
    assert source.where.endswith("(nnU-Net 3d_fullres, fold 0)")
    assert torch.equal(source.weights["stem.0.weight"], sd["encoder.stem.convs.0.conv.weight"])
    assert torch.equal(source.weights["heads.0.weight"], sd["decoder.seg_layers.2.weight"])


def test_train_init_from_through_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    roots = prepare(tmp_path, 4, seed=3, patch=[16, 32, 32], features=[4, 8, 16])
    cfg = json.loads((roots.preprocessed / NAME / "plans.json").read_text())["configurations"]["3d_fullres"]
    source = tmp_path / "source" / NAME
    (source / "3d_fullres" / "fold_all").mkdir(parents=True)
    (source / "3d_fullres" / "plans.json").write_bytes((roots.preprocessed / NAME / "plans.json").read_bytes())
    torch.manual_seed(5)
    save_checkpoint(source / "3d_fullres" / "fold_all", "final", build_network(cfg, 1, 3))  # 3 labels, not 5
    for k, v in env_of(roots).items():
        monkeypatch.setenv(k, v)
    args = ["train", "-d", NAME, "-f", "all", "--epochs", "1", "--iters-per-epoch", "1", "--val-iters", "1",
            "--no-validation", "--device", "cpu", "--num-workers", "0", "--precision", "fp32"]
    assert main(args + ["--init-from", str(source)]) == 0
    out = capsys.readouterr().out
    assert "keep their initialisation" in out and "heads.0.weight" in out
    setup = json.loads((roots.results / NAME / "3d_fullres" / "fold_all" / "training_setup.json").read_text())
    kept = sorted(line.split()[0] for line in setup["init_from"]["initialised"])
    assert kept == [f"heads.{s}.{p}" for s in (0, 1) for p in ("bias", "weight")]
    assert setup["init_from"]["loaded"] == len(build_network(cfg, 1, 5).state_dict()) - 4
    # a source with another network: exit 1 with the reason, no training
    other = copy.deepcopy(cfg)
    other["network"]["features"] = [8, 16, 32]
    bad = tmp_path / "bad" / NAME / "3d_fullres"
    (bad / "fold_all").mkdir(parents=True)
    plans = json.loads((roots.preprocessed / NAME / "plans.json").read_text())
    plans["configurations"]["3d_fullres"] = other
    (bad / "plans.json").write_text(json.dumps(plans))
    save_checkpoint(bad / "fold_all", "final", build_network(other, 1, 5))
    assert main(args + ["--init-from", str(bad)]) == 1
    assert "features [8, 16, 32] (this configuration: [4, 8, 16])" in capsys.readouterr().err
