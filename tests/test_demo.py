"""`autoseg demo` end to end with a budget of seconds: every artefact is produced and the summary is printed."""

import json

from autoseg.cli import main
from autoseg.demo import quality_table


def test_demo_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for k in ("AUTOSEG_RAW", "AUTOSEG_PREPROCESSED", "AUTOSEG_RESULTS"):
        monkeypatch.delenv(k, raising=False)
    argv = ["demo", "-o", "d", "--train-cases", "5", "--test-cases", "2", "--time-budget", "0.01",
            "--iters-per-epoch", "2", "--val-iters", "1", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    d = tmp_path / "d"
    name = "Dataset501_AbdomenPhantom"
    # a budget of 0.6 s holds a handful of iterations: fewer than 3D needs, so the demo measures both and trains 2d
    assert "configuration: 2d: the budget holds" in out and "3d_fullres:" in out
    fold = d / "results" / name / "2d" / "fold_all"
    assert not (d / "results" / name / "3d_fullres").exists()  # measuring a candidate writes nothing
    assert (d / "raw" / name / "dataset.json").is_file()
    assert (d / "preprocessed" / name / "plans.json").is_file()
    for f in ("checkpoint_final.safetensors", "checkpoint_latest.safetensors", "log.jsonl", "progress.png"):
        assert (fold / f).is_file(), f
    assert len(list((d / "predictions").glob("*.nii.gz"))) == 2
    summary = json.loads((d / "evaluation" / "summary.json").read_text())
    assert {"liver", "kidney", "liver_tumor", "kidney_tumor"} <= set(summary["structures"])
    assert (d / "evaluation" / "evaluation.csv").is_file()
    for f in ("report.html", "report.csv", "report.json"):
        assert (d / "report" / f).is_file(), f
    assert len(list((d / "report").rglob("*.png"))) == 2
    assert "demo quality on the held-out test cases" in out and "liver" in out and "report.html" in out
    # a rerun reuses the trained model instead of training again
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "2d: a model of it is already in" in again and "already trained" in again


def test_quality_table_handles_missing_values():
    summary = {"structures": {"liver": {"dice_mean": 0.95}, "kidney": {"dice_mean": 0.5}},
               "lesion_detection": {"liver_tumor": {"iou": {">=10mm": {"recall": None, "n_reference": 0}}}}}
    lines, ok = quality_table(summary)
    assert not ok
    assert any("liver " in line and "met" in line and "NOT" not in line for line in lines)
    assert any("kidney " in line and "NOT met" in line for line in lines)
    assert len(lines) == 6
