"""A rerun of `predict` keeps what the same model made and redoes what another model made: each case's outputs are
recorded with the model's identity (weights as loaded, plans, step, mirroring, postprocessing) in CASE.model.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from autoseg.checkpoint import save_checkpoint
from autoseg.cli import main
from autoseg.io.images import read_image, write_image
from autoseg.labels import DEFAULT_LABELS
from autoseg.layout import fold_dir
from autoseg.network import build_network
from field_helpers import DATASET, right_handed_case, tiny_model


@pytest.fixture()
def setup(roots, tmp_path):
    model = tiny_model(roots["AUTOSEG_RESULTS"])
    image, _, geo = right_handed_case()
    write_image(tmp_path / "in" / "scan_0000.nii.gz", image, geo)
    return model, tmp_path


def _predict(root, out: str, *extra: str) -> int:
    return main(["predict", "-i", str(root / "in"), "-o", str(root / out), "-d", DATASET, "--no-tta", *extra])


def _retrain(model, seed: int) -> None:
    """Replace fold 0's final weights, as training the fold again would."""
    config_dir = model / "3d_fullres"
    cfg = json.loads((config_dir / "plans.json").read_text())["configurations"]["3d_fullres"]
    torch.manual_seed(seed)
    save_checkpoint(fold_dir(config_dir, "0"), "final", build_network(cfg, 1, len(DEFAULT_LABELS)))


def _state(path):
    return path.stat().st_mtime_ns, read_image(path)[0]


def test_rerun_redoes_cases_of_a_retrained_model_only(setup):
    model, root = setup
    out = root / "out" / "scan.nii.gz"
    assert _predict(root, "out") == 0
    record = json.loads((root / "out" / "scan.model.json").read_text())
    assert record["outputs"] == ["scan.nii.gz"] and len(record["model"]) == 64
    stamp, first = _state(out)
    assert _predict(root, "out") == 0
    assert _state(out)[0] == stamp  # same model: kept
    _retrain(model, seed=0)  # the same weights written again (a new file, a new mtime): still the same model
    assert _predict(root, "out") == 0
    assert _state(out)[0] == stamp
    _retrain(model, seed=1)  # really retrained
    assert _predict(root, "out") == 0
    stamp2, second = _state(out)
    assert stamp2 != stamp and not np.array_equal(second, first)
    assert _predict(root, "fresh") == 0  # what the retrained model predicts from scratch
    assert np.array_equal(second, read_image(root / "fresh" / "scan.nii.gz")[0])
    assert json.loads((root / "out" / "scan.model.json").read_text())["model"] != record["model"]


def test_changed_postprocessing_or_settings_redo_the_case(setup):
    model, root = setup
    out = root / "out" / "scan.nii.gz"
    assert _predict(root, "out") == 0
    stamp = out.stat().st_mtime_ns
    plan = json.loads((model / "inference_plan.json").read_text())
    plan["postprocessing"]["largest_component_labels"] = []
    (model / "inference_plan.json").write_text(json.dumps(plan))
    assert _predict(root, "out") == 0
    stamp2 = out.stat().st_mtime_ns
    assert stamp2 != stamp
    assert _predict(root, "out", "--step", "0.75") == 0  # another sliding-window step predicts other labels
    assert out.stat().st_mtime_ns != stamp2


def test_outputs_without_a_record_are_predicted_again(setup):
    """An output whose record is missing (a run killed between the two writes, or an older autoseg) or does not
    list it (probabilities asked for only now) is not trusted."""
    model, root = setup
    out = root / "out"
    assert _predict(root, "out") == 0
    stamp = (out / "scan.nii.gz").stat().st_mtime_ns
    (out / "scan.model.json").unlink()
    assert _predict(root, "out") == 0
    assert (out / "scan.nii.gz").stat().st_mtime_ns != stamp and (out / "scan.model.json").is_file()
    assert _predict(root, "out", "--save-probabilities") == 0
    assert json.loads((out / "scan.model.json").read_text())["outputs"] == ["scan.nii.gz", "scan.npz"]
    (out / "scan.model.json").write_text("{not json")  # a damaged record: redone, not an error
    assert _predict(root, "out") == 0
    assert json.loads((out / "scan.model.json").read_text())["outputs"] == ["scan.nii.gz"]
