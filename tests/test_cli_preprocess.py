"""plan_and_preprocess end to end on a small phantom, through the CLI entry point."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.cli import build_parser, main
from autoseg.io.dataset import list_cases, load_dataset_json, read_case
from autoseg.preprocessing.preprocess import restore_labels
from autoseg.schemas import validate

NAME = "Dataset501_AbdomenPhantom"


def test_plan_and_preprocess_end_to_end(small_dataset, roots, capsys):
    assert main(["plan_and_preprocess", "-d", "501", "-np", "1"]) == 0
    out = roots["AUTOSEG_PREPROCESSED"] / NAME
    plans = json.loads((out / "plans.json").read_text())
    validate(plans, "plans")
    validate(json.loads((out / "fingerprint.json").read_text()), "fingerprint")
    assert plans["configurations"]["2d"]["data_identifier"] == "3d_fullres"
    assert not (out / "2d").exists()  # 2d reuses the 3d_fullres data
    assert "3d_fullres" in capsys.readouterr().out
    meta = load_dataset_json(small_dataset)
    cases = list_cases(small_dataset, meta)
    assert len(cases) == 6
    folder = out / "3d_fullres"
    for case in cases:
        data = np.load(folder / f"{case.case_id}.npy", mmap_mode="r", allow_pickle=False)
        seg = np.load(folder / f"{case.case_id}_seg.npy", allow_pickle=False)
        props = json.loads((folder / f"{case.case_id}.json").read_text())
        assert data.dtype == np.float32 and data.shape[1:] == seg.shape == tuple(props["shape_after_resample"])
        assert props["spacing"] == plans["configurations"]["3d_fullres"]["spacing"]
        # the inverse restores the original grid exactly and the labels closely
        _, ref, geometry = read_case(case)
        back, bgeo = restore_labels(seg, props)
        assert bgeo == geometry and back.shape == ref.shape
        fg = (ref > 0).sum()
        assert 2 * np.logical_and(back > 0, ref > 0).sum() / ((back > 0).sum() + fg) > 0.9
        with np.load(folder / f"{case.case_id}_fg.npz", allow_pickle=False) as fgz:
            for key in fgz.files:
                if key.startswith("class_"):  # component_<v> holds each coordinate's connected component
                    assert np.all(seg[tuple(fgz[key].astype(np.intp).T)] == int(key.split("_")[1]))
    assert not list(folder.glob(".tmp-*"))


def test_rerun_skips_and_is_deterministic(small_dataset, roots):
    assert main(["plan_and_preprocess", "-d", NAME, "-np", "1", "-c", "3d_fullres"]) == 0
    out = roots["AUTOSEG_PREPROCESSED"] / NAME
    fp1 = (out / "fingerprint.json").read_bytes()
    plans1 = (out / "plans.json").read_bytes()
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "3d_fullres").iterdir()}
    (out / "fingerprint.json").unlink()
    victim = out / "3d_fullres" / "phantom_002.json"
    victim.unlink()  # as if killed before this case finished
    assert main(["plan_and_preprocess", "-d", NAME, "-np", "2", "-c", "3d_fullres"]) == 0
    assert (out / "fingerprint.json").read_bytes() == fp1  # byte-identical, serial or parallel
    assert (out / "plans.json").read_bytes() == plans1
    after = {p.name: p.stat().st_mtime_ns for p in (out / "3d_fullres").iterdir()}
    redone = sorted(n for n in after if after[n] != mtimes.get(n))
    assert redone == ["phantom_002.json", "phantom_002.npy", "phantom_002_fg.npz", "phantom_002_seg.npy"]


def test_fingerprint_of_another_shape_is_recomputed(small_dataset, roots):
    """A fingerprint.json without a case list (hand-edited, another tool's) is recomputed, not a KeyError."""
    out = roots["AUTOSEG_PREPROCESSED"] / NAME
    out.mkdir(parents=True)
    (out / "fingerprint.json").write_text('{"spacings": []}')
    assert main(["plan_and_preprocess", "-d", NAME, "-np", "1", "-c", "3d_fullres"]) == 0
    fingerprint = json.loads((out / "fingerprint.json").read_text())
    validate(fingerprint, "fingerprint")
    assert len(fingerprint["cases"]) == 6


def test_bad_case_reported_by_name_and_no_partial_fingerprint(small_dataset, roots, capsys):
    bad = small_dataset / "imagesTr" / "phantom_003_0000.nii.gz"
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])  # a copy cut short: ITK would zero-fill it silently
    assert main(["plan_and_preprocess", "-d", "501", "-np", "1"]) == 1
    err = capsys.readouterr().err
    assert "phantom_003_0000.nii.gz" in err and "truncated or corrupt" in err
    out = roots["AUTOSEG_PREPROCESSED"] / NAME
    assert not (out / "fingerprint.json").exists()  # no fingerprint of part of a dataset


def test_verify_reports_all_problems(small_dataset, capsys):
    label = small_dataset / "labelsTr" / "phantom_001.nii.gz"
    img = sitk.ReadImage(str(label))
    img.SetSpacing((9.0, 9.0, 9.0))
    sitk.WriteImage(img, str(label))
    (small_dataset / "labelsTr" / "phantom_004.nii.gz").unlink()
    assert main(["plan_and_preprocess", "-d", "501", "--verify", "-np", "1"]) == 1
    err = capsys.readouterr().err
    assert "labelsTr/phantom_001.nii.gz: spacing" in err
    assert "phantom_004" in err and "2 problem(s)" in err


def test_plan_command_and_bad_fingerprint(tmp_path, capsys):
    fp = tmp_path / "fp.json"
    fp.write_text('{"schema_version": 1}')
    assert main(["plan", "-f", str(fp), "-o", str(tmp_path / "p.json")]) == 1
    assert "fingerprint does not match its schema" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_unknown_dataset_is_a_clear_error(roots, capsys):
    assert main(["plan_and_preprocess", "-d", "777"]) == 1
    assert "no dataset with id 777" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["plan_and_preprocess", "plan", "phantom"])
def test_help_documents_every_flag(command, capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--help"])
    text = capsys.readouterr().out
    sub = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == command)[1]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help"
            assert action.option_strings[-1] in text
