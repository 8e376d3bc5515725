"""find_best_configuration on constructed cross-validation outputs: the table, the choice, the pairwise ensemble
and postprocessing, all from known masks (no training)."""

import json
from pathlib import Path

import numpy as np
import pytest

from autoseg.cli import main
from autoseg.io.images import Geometry, write_image, write_probabilities
from autoseg.inference.selection import find_best_configuration
from autoseg.layout import checkpoint_file

NAME = "Dataset501_AbdomenPhantom"
META = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": 4,
        "file_ending": ".nii.gz"}
GEO = Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), (16, 24, 24))
CASES = ["c0", "c1", "c2", "c3"]


def reference(i: int) -> np.ndarray:
    ref = np.zeros(GEO.shape, np.uint8)
    ref[4:12, 6 + i:18, 6:18] = 1
    return ref


def probs_of(labels: np.ndarray) -> np.ndarray:
    """Soft one-hot (0.9 on the label) so averaging two models is a real vote."""
    onehot = np.stack([labels == 0, labels == 1]).astype(np.float32)
    return 0.1 + 0.8 * onehot


def write_cv(results, config: str, preds: dict[str, np.ndarray], folds=("0", "1"), final: bool = True) -> None:
    """Validation outputs of trained folds (``final``: with the checkpoint_final a finished training leaves)."""
    for k, fold in enumerate(folds):
        folder = results / NAME / config / f"fold_{fold}" / "validation"
        folder.mkdir(parents=True)
        if final:
            checkpoint_file(folder.parent, "final").write_bytes(b"weights")
        mine = CASES[k::len(folds)]
        for case in mine:
            write_image(folder / f"{case}.nii.gz", preds[case], GEO)
            write_probabilities(folder / f"{case}.npz", probs_of(preds[case]), GEO)
        (folder / "summary.json").write_text(json.dumps({"dice_per_case": {c: {} for c in mine}}))


def _dataset_roots(tmp_path, monkeypatch) -> Path:
    """The three roots under ``tmp_path`` in the environment, the preprocessed dataset.json and an empty labelsTr
    (returned)."""
    for k, sub in (("AUTOSEG_RAW", "raw"), ("AUTOSEG_PREPROCESSED", "pp"), ("AUTOSEG_RESULTS", "results")):
        monkeypatch.setenv(k, str(tmp_path / sub))
    labels = tmp_path / "raw" / NAME / "labelsTr"
    labels.mkdir(parents=True)
    (tmp_path / "pp" / NAME).mkdir(parents=True)
    (tmp_path / "pp" / NAME / "dataset.json").write_text(json.dumps(META))
    return labels


@pytest.fixture()
def layout(tmp_path, monkeypatch):
    labels = _dataset_roots(tmp_path, monkeypatch)
    refs = {c: reference(i) for i, c in enumerate(CASES)}
    for c, ref in refs.items():
        write_image(labels / f"{c}.nii.gz", ref, GEO)
    # 3d_fullres: exact organ plus a far false-positive blob (largest-component postprocessing fixes it);
    # 2d: the organ with one slab missing (worse, and no postprocessing can fix it)
    full, flat = {}, {}
    for c, ref in refs.items():
        full[c] = ref.copy()
        full[c][0:2, 0:3, 0:3] = 1
        flat[c] = ref.copy()
        flat[c][4:7] = 0
    write_cv(tmp_path / "results", "3d_fullres", full)
    write_cv(tmp_path / "results", "2d", flat)
    return tmp_path, refs, full, flat


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_chooses_best_candidate_and_postprocessing(layout):
    tmp_path, refs, full, flat = layout
    plan = find_best_configuration(tmp_path / "results" / NAME, tmp_path / "raw" / NAME / "labelsTr", META)
    table = plan["mean_foreground_dice"]
    assert set(table) == {"2d", "3d_fullres", "2d+3d_fullres"}
    assert table["3d_fullres"] == pytest.approx(np.mean([dice(full[c], refs[c]) for c in CASES]), abs=1e-6)
    assert table["2d"] == pytest.approx(np.mean([dice(flat[c], refs[c]) for c in CASES]), abs=1e-6)
    # two models with equal soft votes: ties go to the first class (background), so the ensemble is the intersection
    both = {c: (full[c] & flat[c]) for c in CASES}
    assert table["2d+3d_fullres"] == pytest.approx(np.mean([dice(both[c], refs[c]) for c in CASES]), abs=1e-6)
    assert plan["configurations"] == ["3d_fullres"] and plan["cases"] == 4
    assert plan["folds"] == {"3d_fullres": ["0", "1"]}
    assert plan["postprocessing"]["largest_component_foreground"] is True  # removes the blob: Dice 1
    assert any("kept" in n for n in plan["notes"])


def test_cascade_competes_like_any_configuration(layout):
    tmp_path, refs, full, flat = layout
    write_cv(tmp_path / "results", "3d_cascade", refs)  # stage 2 inside the organ ROI: exact here
    write_cv(tmp_path / "results", "3d_lowres", flat)  # its stage 1 has validation results too
    plan = find_best_configuration(tmp_path / "results" / NAME, tmp_path / "raw" / NAME / "labelsTr", META)
    assert {"3d_cascade", "3d_lowres", "3d_cascade+3d_fullres"} <= set(plan["mean_foreground_dice"])
    assert plan["configurations"] == ["3d_cascade"] and plan["folds"] == {"3d_cascade": ["0", "1"]}


def test_cli_writes_inference_plan_and_prints_table(layout, capsys):
    tmp_path, *_ = layout
    assert main(["find_best_configuration", "-d", NAME]) == 0
    out = capsys.readouterr().out
    assert "3d_fullres" in out and "2d+3d_fullres" in out
    plan = json.loads((tmp_path / "results" / NAME / "inference_plan.json").read_text())
    assert plan["configurations"] == ["3d_fullres"]


def test_no_validation_results_is_a_clear_error(tmp_path, monkeypatch, capsys):
    _dataset_roots(tmp_path, monkeypatch)
    (tmp_path / "results" / NAME / "3d_fullres").mkdir(parents=True)
    assert main(["find_best_configuration", "-d", NAME]) == 1
    assert "no configuration has validation results" in capsys.readouterr().err


def test_review_threshold_calibrated_on_cross_validation(tmp_path, monkeypatch, capsys):
    """Two good cases with confident probabilities, two with half the organ missing (Dice 0.67 < 0.7) and soft
    probabilities: the flag's threshold must sit just above the worse cases' expected Dice."""
    from autoseg.inference.uncertainty import expected_dice
    from autoseg.jsonfile import read_json

    labels = _dataset_roots(tmp_path, monkeypatch)
    estimates = {}
    for i, c in enumerate(CASES):
        ref = reference(0)
        write_image(labels / f"{c}.nii.gz", ref, GEO)
        seg = ref.copy()
        if i >= 2:
            seg[8:12] = 0  # half the organ missed
        sure = 0.99 if i < 2 else 0.6 + 0.1 * i  # the bad cases are also the unsure ones
        probs = np.stack([np.where(seg == 1, 1 - sure, sure), np.where(seg == 1, sure, 1 - sure)]).astype(np.float32)
        probs[1][seg == 0] = 0.001
        probs[0][seg == 0] = 0.999
        folder = tmp_path / "results" / NAME / "3d_fullres" / f"fold_{i % 2}" / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        write_image(folder / f"{c}.nii.gz", seg, GEO)
        write_probabilities(folder / f"{c}.npz", probs, GEO)
        estimates[c] = expected_dice(probs.astype(np.float16).astype(np.float32), seg, [1])["1"]
    for fold in ("0", "1"):
        folder = tmp_path / "results" / NAME / "3d_fullres" / f"fold_{fold}" / "validation"
        (folder / "summary.json").write_text(json.dumps({"dice_per_case": {c: {} for c in CASES[int(fold)::2]}}))
        checkpoint_file(folder.parent, "final").write_bytes(b"weights")  # folds trained to the end
    assert main(["find_best_configuration", "-d", NAME]) == 0
    assert "review: flag when organ expected Dice <" in capsys.readouterr().out
    plan = read_json(tmp_path / "results" / NAME / "inference_plan.json", "", "inference_plan")  # schema-checked
    rule = plan["review"]["structures"]["1"]
    low = sorted(estimates[c] for c in CASES[2:])
    good = min(estimates[c] for c in CASES[:2])
    assert low[-1] < good  # the construction: the bad cases are the less certain ones
    assert rule["expected_dice_below"] == pytest.approx((low[-1] + good) / 2, abs=1e-6)
    assert rule["low_dice_cases"] == 2 and rule["cv_sensitivity"] == 1.0 and rule["cv_specificity"] == 1.0
    assert plan["review"]["cases"] == 4 and rule["name"] == "organ"


def test_folds_without_final_checkpoint_are_ignored(layout):
    """A fold whose training stopped after an earlier validation (no checkpoint_final) must not be scored: a
    perfect but unfinished 2d would otherwise win, and its folds could not be predicted with."""
    tmp_path, refs, full, flat = layout
    write_cv(tmp_path / "results", "3d_lowres", refs, final=False)  # exact, but never finished
    plan = find_best_configuration(tmp_path / "results" / NAME, tmp_path / "raw" / NAME / "labelsTr", META)
    assert "3d_lowres" not in plan["mean_foreground_dice"]
    assert not any("3d_lowres" in c for c in plan["mean_foreground_dice"])
    assert plan["configurations"] == ["3d_fullres"]
    assert any("3d_lowres/fold_0" in n and "checkpoint_final" in n for n in plan["notes"])
    # one fold of 3d_fullres unfinished: only the other fold's cases are scored, and only it is planned
    checkpoint_file(tmp_path / "results" / NAME / "3d_fullres" / "fold_1", "final").unlink()
    plan = find_best_configuration(tmp_path / "results" / NAME, tmp_path / "raw" / NAME / "labelsTr", META)
    assert plan["configurations"] == ["3d_fullres"] and plan["folds"] == {"3d_fullres": ["0"]}
    assert plan["cases"] == 2  # c0, c2 (fold 0), shared with 2d


def test_only_unfinished_folds_is_a_clear_error(tmp_path, monkeypatch, capsys):
    _dataset_roots(tmp_path, monkeypatch)
    write_cv(tmp_path / "results", "3d_fullres", {c: reference(i) for i, c in enumerate(CASES)}, final=False)
    assert main(["find_best_configuration", "-d", NAME]) == 1
    err = capsys.readouterr().err
    assert "trained to the end" in err and "3d_fullres/fold_0" in err
