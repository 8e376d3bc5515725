"""Inference: geometry round trips, fold averaging, postprocessing selection, folder prediction and ensembling."""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from autoseg.atomic import write_json
from autoseg.checkpoint import save_checkpoint
from autoseg.cli import main
from autoseg.io.images import Geometry, read_image, write_image
from autoseg.inference.ensemble import ensemble_folders
from autoseg.inference.postprocess import apply_postprocessing, determine_postprocessing, largest_component
from autoseg.inference.predictor import Predictor, predict_folder, sliding_window
from autoseg.network import build_network
from autoseg.planning.planner import plan
from autoseg.precision import Precision

RULES = {"image_order": 3, "label_order": 1, "out_of_plane_order": 0, "anisotropy_threshold": 3.0}
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
ROOT = Path(__file__).resolve().parents[1]


class Threshold(nn.Module):
    """Stand-in network: class 1 wherever the (normalised) input is positive."""

    num_outputs = 2
    deep_supervision = False

    def forward(self, x):
        return torch.cat([-10 * x, 10 * x], 1)


def fake_predictor(spacing_zyx, mirror=False, n_models=1):
    plans = {
        "normalization": [{"channel": 0, "scheme": "ct", "clip": [-1000.0, 1000.0], "mean": 0.0, "std": 1.0}],
        "configurations": {"3d_fullres": {"dims": 3, "patch_size": [16, 16, 16], "spacing": list(spacing_zyx),
                                          "resampling": RULES}},
    }
    meta = {"labels": {"background": 0, "lesion": 1}, "channel_names": {"0": "CT"}, "numTraining": 1,
            "file_ending": ".nii.gz"}
    return Predictor(plans, meta, "3d_fullres", [Threshold() for _ in range(n_models)], torch.device("cpu"), mirror)


def sphere_image(shape=(20, 30, 34), spacing_xyz=(0.9, 0.9, 2.5)):
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    sx, sy, sz = spacing_xyz
    r = np.sqrt(((z - 10) * sz) ** 2 + ((y - 14) * sy) ** 2 + ((x - 17) * sx) ** 2)
    ref = (r < 9).astype(np.uint8)
    image = np.where(ref > 0, 100.0, -100.0).astype(np.float32)
    geo = Geometry(spacing_xyz, (-120.5, 33.25, 7.0), DIRECTION, shape)
    return image, ref, geo


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("target_spacing", [(2.5, 0.9, 0.9), (2.0, 1.2, 1.2)])
def test_predict_array_restores_original_grid(target_spacing):
    image, ref, geo = sphere_image()
    probs = fake_predictor(target_spacing).predict_array(image[None], geo)
    assert probs.shape == (2,) + ref.shape and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    seg = probs.argmax(0)
    if target_spacing == (2.5, 0.9, 0.9):  # no resampling: exact
        assert np.array_equal(seg, ref)
    else:
        assert dice(seg, ref) > 0.95


def test_fold_averaging_of_identical_models_equals_each():
    image, _, geo = sphere_image()
    one = fake_predictor((2.0, 1.2, 1.2)).predict_array(image[None], geo)
    three = fake_predictor((2.0, 1.2, 1.2), n_models=3).predict_array(image[None], geo)
    np.testing.assert_allclose(one, three, atol=1e-6)
    mirrored = fake_predictor((2.0, 1.2, 1.2), mirror=True).predict_array(image[None], geo)
    np.testing.assert_allclose(one, mirrored, atol=1e-5)  # the stand-in is flip-equivariant


def test_predict_folder_geometry_skip_and_bad_case(tmp_path):
    image, ref, geo = sphere_image()
    src, out = tmp_path / "in", tmp_path / "out"
    write_image(src / "a_0000.nii.gz", image, geo)
    write_image(src / "b_0000.nii.gz", image[::-1].copy(), geo)
    (src / "broken_0000.nii.gz").write_bytes(b"not a nifti")
    (src / "notes.txt").write_text("stray")
    problems = predict_folder([fake_predictor((2.5, 0.9, 0.9))], src, out, save_probabilities=True)
    assert any("broken_0000.nii.gz" in p for p in problems) and any("notes.txt" in p for p in problems)
    seg, out_geo = read_image(out / "a.nii.gz")
    assert out_geo == read_image(src / "a_0000.nii.gz")[1]  # the input file's geometry, exactly
    assert seg.dtype == np.uint8 and np.array_equal(seg, ref)
    img = sitk.ReadImage(str(out / "a.nii.gz"))
    assert img.GetDirection() == DIRECTION
    assert sorted(p.name for p in out.iterdir()) == ["a.model.json", "a.nii.gz", "a.npz", "b.model.json", "b.nii.gz",
                                                     "b.npz"]
    stamp = (out / "a.nii.gz").stat().st_mtime_ns
    predict_folder([fake_predictor((2.5, 0.9, 0.9))], src, out)
    assert (out / "a.nii.gz").stat().st_mtime_ns == stamp  # finished cases are skipped
    predict_folder([fake_predictor((2.5, 0.9, 0.9))], src, out, overwrite=True)
    assert (out / "a.nii.gz").stat().st_mtime_ns != stamp
    # ensembling two copies of the same probabilities reproduces the labels
    ens = tmp_path / "ens"
    assert ensemble_folders([out, out], ens, ".nii.gz", None) == 2
    assert np.array_equal(read_image(ens / "a.nii.gz")[0], seg)


def test_postprocessing_kept_only_when_it_helps():
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[2:10, 2:10, 2:10] = 1  # one organ
    ref[12:15, 12:15, 12:15] = 2  # one lesion ...
    ref[15:18, 2:5, 2:5] = 2  # ... and a second, separate lesion
    pred = ref.copy()
    pred[17:19, 15:18, 15:18] = 1  # a spurious island of label 1
    spec, notes = determine_postprocessing([pred], [ref], [1, 2])
    assert spec["largest_component_labels"] == [1]  # removes the island
    assert 2 not in spec["largest_component_labels"]  # would delete a real lesion
    assert not spec["largest_component_foreground"]  # would delete the lesions
    assert len(notes) == 3
    assert np.array_equal(apply_postprocessing(pred, spec), ref)
    m = np.zeros((5, 5, 5), bool)
    m[0, 0, 0] = m[4, 4, 4] = True
    m[2, 2, 1:4] = True
    assert largest_component(m).sum() == 3


def test_predict_cli_errors_are_clear(roots, capsys):
    assert main(["predict", "-i", str(roots["AUTOSEG_RAW"]), "-o", str(roots["AUTOSEG_RAW"] / "x")]) == 1
    assert "-d DATASET" in capsys.readouterr().err
    (roots["AUTOSEG_RAW"] / "Dataset501_X").mkdir(parents=True)
    assert main(["predict", "-i", "nowhere", "-o", "out", "-d", "501"]) == 1
    assert "not a trained configuration" in capsys.readouterr().err


def _random_model(results, plans, meta):
    folder = results / "Dataset501_X" / "3d_fullres"
    write_json(folder / "plans.json", plans)
    write_json(folder / "dataset.json", meta)
    save_checkpoint(folder / "fold_0", "final", build_network(plans["configurations"]["3d_fullres"], 1, 2))
    return folder


@pytest.fixture()
def small_plans():
    fp = json.loads((ROOT / "fingerprints" / "demo_phantom.json").read_text())
    p = plan(fp, device="cpu")
    p["configurations"]["3d_fullres"]["patch_size"] = [16, 16, 16]
    return p


def test_predict_precision_flag_fp32_and_auto(roots, small_plans, capsys):
    meta = {"labels": {"background": 0, "lesion": 1}, "channel_names": {"0": "CT"}, "numTraining": 1,
            "file_ending": ".nii.gz"}
    _random_model(roots["AUTOSEG_RESULTS"], small_plans, meta)
    (roots["AUTOSEG_RAW"] / "Dataset501_X").mkdir(parents=True)
    image, _, geo = sphere_image()
    src = roots["AUTOSEG_RAW"] / "in"
    write_image(src / "a_0000.nii.gz", image, geo)
    seg = {}
    for mode in ("fp32", "auto"):
        out = roots["AUTOSEG_RAW"] / f"out_{mode}"
        assert main(["predict", "-i", str(src), "-o", str(out), "-d", "501", "--device", "cpu", "--no-tta",
                     "--precision", mode]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if "3d_fullres: precision" in x)
        if mode == "fp32":
            assert line.startswith("3d_fullres: precision fp32") and "as asked" in line
        else:
            chosen = line.split("precision ")[1].split(" on cpu")[0]
            assert chosen in ("fp32", "fp32 channels-last", "bf16", "bf16 channels-last")
            assert "'fp32': " in line  # float32 was measured
        seg[mode] = read_image(out / "a.nii.gz")[0]
    assert seg["fp32"].shape == seg["auto"].shape == image.shape
    assert (seg["fp32"] != seg["auto"]).mean() < 0.01  # the same random network, any sound mode
    with pytest.raises(SystemExit):
        main(["predict", "-i", str(src), "-o", "x", "-d", "501", "--precision", "int8"])


def test_sliding_window_in_bf16_channels_last_matches_fp32(small_plans):
    net = build_network(small_plans["configurations"]["3d_fullres"], 1, 2).eval()
    net.deep_supervision = False
    data = torch.randn(1, 20, 24, 20, generator=torch.Generator().manual_seed(0))
    ref = sliding_window(net, data, [16, 16, 16], 2)
    net.to(memory_format=torch.channels_last_3d)
    low = sliding_window(net, data, [16, 16, 16], 2, precision=Precision("bf16", True))
    assert low.dtype == torch.float32 and low.shape == ref.shape
    # a random-weight network has small, unconfident logits: bf16 moves them by a few percent
    assert torch.linalg.vector_norm(low - ref) / torch.linalg.vector_norm(ref) < 0.1
    assert (low.argmax(0) == ref.argmax(0)).float().mean() > 0.9
    assert not torch.equal(low, ref)  # bf16 really ran
