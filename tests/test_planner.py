"""The planner is a pure function: golden cases pin it, and its rules are tested on constructed fingerprints."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from autoseg.errors import AutosegError
from autoseg.planning.planner import CASCADE_FOREGROUND, estimate_memory_gb, fullres_spacing, plan, topology
from autoseg.schemas import validate

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = sorted(p.stem for p in (ROOT / "fingerprints").glob("*.json") if p.stem != "schema")


def test_golden_cases_exist():
    assert {"kits19", "demo_phantom"} <= set(GOLDEN)


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_plans(name):
    """If this fails after an intentional planner change, run `make goldens` and review the diff of plans/."""
    fingerprint = json.loads((ROOT / "fingerprints" / f"{name}.json").read_text())
    validate(fingerprint, "fingerprint")
    expected = json.loads((ROOT / "plans" / f"{name}.json").read_text())
    assert plan(fingerprint) == expected


def test_plan_is_deterministic_and_valid():
    fp = json.loads((ROOT / "fingerprints" / "kits19.json").read_text())
    a, b = plan(fp), plan(copy.deepcopy(fp))
    assert json.dumps(a) == json.dumps(b)
    validate(a, "plans")


def test_anisotropy_rule_takes_10th_percentile():
    # 10 thick-slice cases (5 mm) and 2 thin ones (1 mm); in-plane 0.8 mm; few slices
    spacings = np.array([[5.0, 0.8, 0.8]] * 10 + [[1.0, 0.8, 0.8]] * 2)
    shapes = np.array([[40, 512, 512]] * 12)
    target, note = fullres_spacing(spacings, shapes)
    assert target[0] == pytest.approx(np.percentile(spacings[:, 0], 10))
    assert target[1:] == [0.8, 0.8]
    assert "anisotropic" in note


def test_anisotropy_rule_not_applied_to_isotropic_or_many_slices():
    spacings = np.array([[1.0, 1.0, 1.0], [1.2, 1.0, 1.0], [1.1, 0.9, 0.9]])
    shapes = np.array([[100, 100, 100]] * 3)
    assert fullres_spacing(spacings, shapes)[0] == [1.1, 1.0, 1.0]
    # thick spacing but many voxels along the axis: no anisotropy handling (voxel condition fails)
    spacings = np.array([[4.0, 1.0, 1.0]] * 3)
    shapes = np.array([[200, 200, 200]] * 3)
    assert fullres_spacing(spacings, shapes)[0] == [4.0, 1.0, 1.0]


def test_topology_does_not_pool_coarse_axis_first():
    net = topology([4.0, 1.0, 1.0], [32, 128, 128])
    assert net["strides"][1] == [1, 2, 2] and net["strides"][2] == [2, 2, 2]  # z waits until in-plane catches up
    assert net["kernel_sizes"][0] == [1, 3, 3]  # no conv across 4 mm slices at full resolution
    assert all(min(k) >= 1 for k in net["kernel_sizes"])
    for ax, size in enumerate([32, 128, 128]):
        total = int(np.prod([s[ax] for s in net["strides"]]))
        assert size // total >= 4  # feature maps never below 4 voxels
    assert net["features"][0] == 32 and max(net["features"]) <= 320


def test_memory_grows_with_patch_and_batch():
    net = topology([1.0, 1.0, 1.0], [128, 128, 128])
    small = estimate_memory_gb([64, 64, 64], 2, net, 1, 3)
    big = estimate_memory_gb([128, 128, 128], 2, net, 1, 3)
    assert big > small > 1.0
    assert estimate_memory_gb([128, 128, 128], 4, net, 1, 3) > big
    # calibration: the familiar nnU-Net 128^3, batch 2 fits an 8 GB budget
    assert big < 8.0


def test_plan_fits_budget_and_divisibility():
    fp = json.loads((ROOT / "fingerprints" / "kits19.json").read_text())
    for gb in (4.0, 8.0, 24.0):
        p = plan(fp, gpu_memory_gb=gb)
        for name, cfg in p["configurations"].items():
            assert cfg["estimated_memory_gb"] <= gb, (gb, name)
            for ax, size in enumerate(cfg["patch_size"]):
                total = int(np.prod([s[ax] for s in cfg["network"]["strides"]]))
                assert size % total == 0
            assert cfg["notes"], "every configuration explains itself"
    small, large = plan(fp, 4.0), plan(fp, 24.0)
    assert np.prod(small["configurations"]["3d_fullres"]["patch_size"]) < np.prod(
        large["configurations"]["3d_fullres"]["patch_size"]
    )


def test_ct_normalisation_uses_foreground_percentiles():
    fp = json.loads((ROOT / "fingerprints" / "kits19.json").read_text())
    p = plan(fp)
    st = fp["intensity"]["0"]
    assert p["normalization"] == [
        {"channel": 0, "scheme": "ct", "clip": [st["p00_5"], st["p99_5"]], "mean": st["mean"], "std": st["std"]}
    ]
    fp["channel_names"] = {"0": "T2"}
    assert plan(fp)["normalization"] == [{"channel": 0, "scheme": "zscore"}]


def test_lowres_only_when_fullres_patch_covers_little():
    fp = json.loads((ROOT / "fingerprints" / "kits19.json").read_text())
    assert "3d_lowres" in plan(fp)["configurations"]
    small = copy.deepcopy(fp)
    for c in small["cases"]:
        c["shape_after_crop"] = [60, 90, 90]
        c["spacing"] = [1.0, 1.0, 1.0]
    small["class_fractions"] = {"0": 0.5, "1": 0.4, "2": 0.1}  # no cascade, which would need 3d_lowres
    p = plan(small)
    assert "3d_lowres" not in p["configurations"]
    assert p["configurations"]["3d_fullres"]["patch_size"] == [64, 96, 96]


def test_cpu_plan_is_sized_for_compute():
    fp = json.loads((ROOT / "fingerprints" / "demo_phantom.json").read_text())
    gpu, cpu = plan(fp, device="gpu"), plan(fp, device="cpu")
    assert cpu["device"] == "cpu" and gpu["device"] == "gpu"
    g, c = gpu["configurations"]["3d_fullres"], cpu["configurations"]["3d_fullres"]
    assert c["network"]["features"][0] == 8 and g["network"]["features"][0] == 32
    assert np.prod(c["patch_size"]) < np.prod(g["patch_size"])
    assert 40**3 <= np.prod(c["patch_size"]) <= 96**3 and c["batch_size"] == 2
    assert c["spacing"] == g["spacing"]  # same preprocessing either way
    with pytest.raises(ValueError, match="device"):
        plan(fp, device="tpu")


def test_cascade_only_when_labelled_foreground_is_small():
    fp = json.loads((ROOT / "fingerprints" / "demo_phantom.json").read_text())
    assert sum(v for k, v in fp["class_fractions"].items() if k != "0") < CASCADE_FOREGROUND
    p = plan(fp)
    full, cascade, low = (p["configurations"][c] for c in ("3d_fullres", "3d_cascade", "3d_lowres"))
    assert cascade["previous_stage"] == "3d_lowres" and cascade["roi_margin_mm"] > 0
    assert cascade["data_identifier"] == "3d_fullres"  # no extra preprocessing
    same = {k: v for k, v in cascade.items() if k not in ("previous_stage", "roi_margin_mm", "notes")}
    assert same == {k: v for k, v in full.items() if k != "notes"}
    # the full-resolution patch covers most of this image, so 3d_lowres exists for the cascade alone: 2x spacing
    assert low["spacing"] == [round(2 * s, 6) for s in full["spacing"]]
    assert "3d_cascade needs" in low["notes"][0] and "3d_cascade" in " ".join(p["notes"])

    big = copy.deepcopy(fp)
    big["class_fractions"] = {"0": 0.7, "1": 0.2, "2": 0.02, "3": 0.07, "4": 0.01}
    p = plan(big)
    assert "3d_cascade" not in p["configurations"] and "3d_lowres" not in p["configurations"]
    assert any("no 3d_cascade" in n for n in p["notes"])


def test_cascade_keys_are_validated():
    p = plan(json.loads((ROOT / "fingerprints" / "demo_phantom.json").read_text()))
    del p["configurations"]["3d_cascade"]["roi_margin_mm"]
    with pytest.raises(AutosegError, match="roi_margin_mm"):
        validate(p, "plans")
