"""Reliability: every bad input gives a non-zero exit, a message naming the file/key, the problem and a fix, and no
output that could pass as finished; SIGKILL part-way through preprocessing, training or prediction loses at most
the unit of work in flight and a rerun gives the same result as an uninterrupted run; a worker that runs out of
memory or dies is reported by name.

Everything runs on a 6-case small phantom and a tiny network (patch 16x32x32, features 4-8-16), built once per
module; each test works on its own copy of the folders.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file

import robustness_helpers as h
from autoseg.cli import main
from autoseg.io.dataset import Case
from autoseg.io.images import read_image
from autoseg.errors import AutosegError
from autoseg.parallel import map_cases
from autoseg.phantom import write_dataset

N_SMALL = 8  # small prediction inputs


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread here and in the subprocesses: on a shared 2-core machine two threads fighting another
    process for a core make the tiny network 20x slower; also one thread count for every run compared."""
    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # the trainer keeps it instead of using every core
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, one_thread):
    """One workspace built once: raw phantom (6 training, 2 test cases), preprocessed with the tiny plans, fold 0
    trained uninterrupted for 4 epochs (the reference of the crash test), small prediction inputs and their
    uninterrupted predictions. Tests copy what they need from it."""
    ws = h.Workspace(tmp_path_factory.mktemp("cache"))
    write_dataset(ws.raw_root, 6, seed=7, size="small", num_test=2)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in ws.env_vars().items():
            mp.setenv(k, v)
        assert main(h.PREPROCESS_ARGS) == 0
        h.shrink_plans(ws.pp / "plans.json")
        assert main(h.TRAIN_ARGS) == 0
        h.small_inputs(sorted((ws.ds / "imagesTs").iterdir()), ws.root / "small_in", N_SMALL)
        assert main(h.PREDICT_ARGS + ["-i", str(ws.root / "small_in"), "-o", str(ws.root / "small_ref")]) == 0
    return ws


def workspace(tmp_path, monkeypatch, cache, parts) -> h.Workspace:
    ws = h.Workspace(tmp_path / "ws").copy_from(cache, parts)
    for k, v in ws.env_vars().items():
        monkeypatch.setenv(k, v)
    return ws


# ------------------------------------------------------------------------------------- what may be written


def nothing_preprocessed(ws: h.Workspace) -> None:
    assert not (ws.pp / "fingerprint.json").exists() and not (ws.pp / "plans.json").exists()
    assert not h.finished(ws.pp / "3d_fullres", "*.json")


def preprocessed_all(ws: h.Workspace) -> None:
    assert (ws.pp / "fingerprint.json").is_file() and (ws.pp / "plans.json").is_file()
    cases = sorted(p.name.removesuffix("_0000.nii.gz") for p in (ws.ds / "imagesTr").glob("*_0000.nii.gz"))
    assert [p.stem for p in h.finished(ws.pp / "3d_fullres", "*.json")] == cases


def no_checkpoints(ws: h.Workspace) -> None:
    assert not (list(ws.res_root.rglob("checkpoint_*")) if ws.res_root.exists() else [])


def no_evaluation(folder: Path) -> None:
    assert not [p.name for p in folder.glob("*") if p.name in ("summary.json", "evaluation.csv", "lesions.csv")]


# --------------------------------------------------------------------------------------- the bad-input matrix


@dataclass(frozen=True)
class Bad:
    """One bad input: ``setup`` breaks a copy of the ``parts`` folders and returns the command line; ``expect`` are
    substrings of what the user sees (file or key, problem, fix); ``written`` checks what was left behind."""

    id: str
    parts: tuple[str, ...]
    setup: Callable[[h.Workspace], list[str]]
    expect: tuple[str, ...]
    written: Callable[[h.Workspace], None]
    rc: int = 1


def pp(verify: bool) -> list[str]:
    return h.PREPROCESS_ARGS + (["--verify"] if verify else [])


def mutate(fn: Callable[[h.Workspace], object], verify: bool = False) -> Callable[[h.Workspace], list[str]]:
    def setup(ws: h.Workspace) -> list[str]:
        fn(ws)
        return pp(verify)

    return setup


def _two_channels_one_missing(ws: h.Workspace) -> None:
    h.edit_json(ws.ds / "dataset.json", lambda m: m.update(channel_names={"0": "CT", "1": "CT_late"}))
    for p in sorted((ws.ds / "imagesTr").glob("*_0000.nii.gz")):
        if not p.name.startswith("phantom_002"):
            shutil.copy(p, p.with_name(p.name.replace("_0000", "_0001")))


def _duplicate_ids(ws: h.Workspace) -> None:
    for case in ("Case_1", "case_1"):
        shutil.copy(h.image(ws.ds, "phantom_000"), ws.ds / "imagesTr" / f"{case}_0000.nii.gz")
        shutil.copy(h.label(ws.ds, "phantom_000"), ws.ds / "labelsTr" / f"{case}.nii.gz")
    h.edit_json(ws.ds / "dataset.json", lambda m: m.update(numTraining=8))


def _empty_images(ws: h.Workspace) -> None:
    for p in (ws.ds / "imagesTr").iterdir():
        p.unlink()


def _dir_for_file(ws: h.Workspace) -> None:
    h.image(ws.ds).unlink()
    h.image(ws.ds).mkdir()


def _pp_under_file(ws: h.Workspace) -> list[str]:
    (ws.root / "not_a_folder").write_text("a regular file")
    os.environ["AUTOSEG_PREPROCESSED"] = str(ws.root / "not_a_folder" / "preprocessed")  # undone by monkeypatch
    return pp(False)


def _rerun_with_bad_case(ws: h.Workspace) -> list[str]:
    """A raw image replaced by a broken one after preprocessing: the change is seen (size and mtime), so the
    fingerprint is recomputed instead of reused, and that names the bad case."""
    for case in ("phantom_002", "phantom_003"):
        for p in (ws.pp / "3d_fullres").glob(f"{case}*"):
            p.unlink()
    h.rewrite_array(h.image(ws.ds, "phantom_003"), h.with_nonfinite(np.nan))
    return pp(False)


def _rerun_bad_case_written(ws: h.Workspace) -> None:
    folder = ws.pp / "3d_fullres"
    assert not list(folder.glob("phantom_003*"))  # nothing of the bad one
    assert not h.temporaries(folder)


def _corrupt_fingerprint(ws: h.Workspace) -> list[str]:
    (ws.pp / "fingerprint.json").write_text('{"schema_version": 1, "cases": [')
    return pp(False)


def _train(ws: h.Workspace, *extra: str) -> list[str]:
    return h.TRAIN_ARGS + list(extra)


def _plans_v99(ws: h.Workspace) -> list[str]:
    h.edit_json(ws.pp / "plans.json", lambda p: p.update(schema_version=99))
    return _train(ws)


def _corrupt_preprocessed_case(ws: h.Workspace) -> list[str]:
    h.truncate(ws.pp / "3d_fullres" / "phantom_000.npy")
    return h.TRAIN_ARGS[:6] + ["all"] + h.TRAIN_ARGS[7:]


def _predict(ws: h.Workspace, inputs: Path, *extra: str) -> list[str]:
    return h.PREDICT_ARGS + ["-i", str(inputs), "-o", str(ws.root / "pred"), *extra]


def _mixed_inputs(ws: h.Workspace) -> list[str]:
    folder = ws.root / "mixed"
    h.small_inputs(sorted((ws.ds / "imagesTs").iterdir()), folder, 2)  # small_000, small_001: valid
    src = folder / "small_000_0000.nii.gz"
    shutil.copy(src, folder / "cut_0000.nii.gz")
    h.truncate(folder / "cut_0000.nii.gz")
    shutil.copy(src, folder / "nan_0000.nii.gz")
    h.rewrite_array(folder / "nan_0000.nii.gz", h.with_nonfinite(np.nan))
    sitk.WriteImage(sitk.ReadImage(str(src))[:, :, 3], str(folder / "flat_0000.nii.gz"))
    (folder / "readme.txt").write_text("not an image")
    return _predict(ws, folder)


def _mixed_written(ws: h.Workspace) -> None:
    written = sorted(p.name for p in (ws.root / "pred").iterdir() if not p.name.endswith(".model.json"))
    assert written == ["small_000.nii.gz", "small_001.nii.gz"]


def _no_pred_folder(ws: h.Workspace) -> None:
    assert not (ws.root / "pred").exists()


def _empty_input(ws: h.Workspace) -> list[str]:
    (ws.root / "empty").mkdir()
    return _predict(ws, ws.root / "empty")


def _input_is_file(ws: h.Workspace) -> list[str]:
    (ws.root / "a_file").write_text("x")
    return _predict(ws, ws.root / "a_file")


def _no_checkpoints(ws: h.Workspace) -> list[str]:
    for p in ws.res.rglob("checkpoint_*"):
        p.unlink()
    return _predict(ws, ws.ds / "imagesTs")


def _pred_under_file(ws: h.Workspace) -> list[str]:
    (ws.root / "a_file").write_text("x")
    return h.PREDICT_ARGS + ["-i", str(ws.ds / "imagesTs"), "-o", str(ws.root / "a_file" / "pred")]


def _eval(ws: h.Workspace, pred: Path, *extra: str) -> list[str]:
    return ["evaluate", "-ref", str(ws.ds / "labelsTs"), "-pred", str(pred), "-d", "501", "-np", "1", *extra]


def _pred_copy(ws: h.Workspace) -> Path:
    pred = ws.root / "pred"
    shutil.copytree(ws.ds / "labelsTs", pred)  # perfect predictions, as label maps on the reference grid
    return pred


def _eval_missing(ws: h.Workspace) -> list[str]:
    pred = _pred_copy(ws)
    (pred / "phantom_007.nii.gz").unlink()
    return _eval(ws, pred)


def _eval_wrong_shape(ws: h.Workspace) -> list[str]:
    pred = _pred_copy(ws)
    img = sitk.ReadImage(str(pred / "phantom_007.nii.gz"))
    sitk.WriteImage(img[:, :, 1:], str(pred / "phantom_007.nii.gz"))  # one slice short
    return _eval(ws, pred)


def _eval_out_under_file(ws: h.Workspace) -> list[str]:
    (ws.root / "a_file").write_text("x")
    return _eval(ws, _pred_copy(ws), "-o", str(ws.root / "a_file" / "eval"))


DIRECTION_FLIP_X = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # the phantom's x axis is flipped: differs
RAW = ("raw",)
PP = ("raw", "pp")
TRAINED = ("raw", "res")
F1 = "labelsTr/phantom_001.nii.gz"
I1 = "phantom_001_0000.nii.gz"

BAD_INPUTS = [
    # --- plan_and_preprocess: geometry (with --verify; without it the label is assumed to be on the image grid)
    Bad("shape_mismatch", RAW, mutate(lambda ws: h.rewrite_array(h.label(ws.ds), lambda a: a[:-2]), verify=True),
        (F1, "shape", "differs from image", "resample the label onto the image grid"), nothing_preprocessed),
    Bad("shape_mismatch_no_verify", RAW, mutate(lambda ws: h.rewrite_array(h.label(ws.ds), lambda a: a[:-2])),
        ("phantom_001.nii.gz", "label shape", "differs from image shape", "must be on the same voxel grid"),
        nothing_preprocessed),
    Bad("spacing_mismatch", RAW,
        mutate(lambda ws: h.rewrite_geometry(h.label(ws.ds), spacing=lambda s: tuple(v * 1.5 for v in s)), True),
        (F1 + ": spacing", "differs from image", "resample the label onto the image grid"), nothing_preprocessed),
    Bad("origin_mismatch", RAW,
        mutate(lambda ws: h.rewrite_geometry(h.label(ws.ds), origin=lambda o: tuple(v + 10 for v in o)), True),
        (F1 + ": origin", "differs from image", "resample the label onto the image grid"), nothing_preprocessed),
    Bad("direction_mismatch", RAW,
        mutate(lambda ws: h.rewrite_geometry(h.label(ws.ds), direction=DIRECTION_FLIP_X), True),
        (F1 + ": direction", "differs from image", "resample the label onto the image grid"), nothing_preprocessed),
    # --- missing files
    Bad("missing_channel", RAW, mutate(_two_channels_one_missing, True),
        ("case phantom_002", "channel 1 ('CT_late') missing", "imagesTr/phantom_002_0001.nii.gz", "add the file"),
        nothing_preprocessed),
    Bad("missing_channel_no_verify", RAW, mutate(_two_channels_one_missing),
        ("case phantom_002", "phantom_002_0001.nii.gz", "missing", "run with --verify"), nothing_preprocessed),
    Bad("missing_label", RAW, mutate(lambda ws: h.label(ws.ds, "phantom_004").unlink(), True),
        ("case phantom_004: no label file", "labelsTr/phantom_004.nii.gz", "add the label map"), nothing_preprocessed),
    Bad("missing_label_no_verify", RAW, mutate(lambda ws: h.label(ws.ds, "phantom_004").unlink()),
        ("case phantom_004: no label file", "needs labelsTr/phantom_004"), nothing_preprocessed),
    # --- voxel values
    Bad("undeclared_label", RAW,
        mutate(lambda ws: h.rewrite_array(h.label(ws.ds), lambda a: np.where(a == 1, 7, a).astype(a.dtype)), True),
        (F1, "label values [7]", "not declared in dataset.json", "declare them in 'labels' or fix the label map"),
        nothing_preprocessed),
    Bad("undeclared_label_no_verify", RAW,
        mutate(lambda ws: h.rewrite_array(h.label(ws.ds), lambda a: np.where(a == 1, 7, a).astype(a.dtype))),
        ("phantom_001.nii.gz", "label values [7]", "not declared", "declare them in 'labels' or fix the label map"),
        nothing_preprocessed),
    Bad("nan", RAW, mutate(lambda ws: h.rewrite_array(h.image(ws.ds), h.with_nonfinite(np.nan)), True),
        ("imagesTr/" + I1, "4 NaN voxel(s)", "replace them with finite values"), nothing_preprocessed),
    Bad("nan_no_verify", RAW, mutate(lambda ws: h.rewrite_array(h.image(ws.ds), h.with_nonfinite(np.nan))),
        (I1, "4 NaN", "replace them with finite values"), nothing_preprocessed),
    Bad("inf", RAW, mutate(lambda ws: h.rewrite_array(h.image(ws.ds), h.with_nonfinite(np.inf)), True),
        ("imagesTr/" + I1, "4 Inf voxel(s)", "replace them with finite values"), nothing_preprocessed),
    Bad("inf_no_verify", RAW, mutate(lambda ws: h.rewrite_array(h.image(ws.ds), h.with_nonfinite(-np.inf))),
        (I1, "4 Inf", "replace them with finite values"), nothing_preprocessed),
    # an all-background label map is allowed: a warning (with --verify), exit 0, the case is preprocessed
    Bad("all_background_label", RAW, mutate(lambda ws: h.rewrite_array(h.label(ws.ds), lambda a: a * 0), True),
        ("warning: " + F1, "all background", "adds no foreground examples"), preprocessed_all, rc=0),
    # --- dimensionality and corrupt files
    Bad("image_2d", RAW, mutate(lambda ws: sitk.WriteImage(sitk.ReadImage(str(h.image(ws.ds)))[:, :, 5],
                                                             str(h.image(ws.ds)))),
        (I1, "image is 2D", "autoseg needs 3D volumes"), nothing_preprocessed),
    Bad("image_4d", RAW, mutate(lambda ws: sitk.WriteImage(sitk.JoinSeries([sitk.ReadImage(str(h.image(ws.ds)))] * 2),
                                                             str(h.image(ws.ds))), True),
        ("imagesTr/" + I1, "image is 4D", "split 4D files into _0000, _0001"), nothing_preprocessed),
    Bad("truncated_nii_gz", RAW, mutate(lambda ws: h.truncate(h.image(ws.ds)), True),
        ("imagesTr/" + I1, "truncated or corrupt", "copy it again from the source"), nothing_preprocessed),
    Bad("non_image_in_imagesTr", RAW, mutate(lambda ws: (ws.ds / "imagesTr" / "notes.txt").write_text("x"), True),
        ("imagesTr/notes.txt: stray file", "not named CASE_XXXX.nii.gz", "remove or rename it"), nothing_preprocessed),
    Bad("non_image_in_imagesTr_no_verify", RAW,
        mutate(lambda ws: (ws.ds / "imagesTr" / "notes.txt").write_text("x")),
        ("imagesTr/notes.txt", "not an image of the form CASE_XXXX.nii.gz", "run with --verify"),
        nothing_preprocessed),
    # case ids differing only in letter case: verify refuses them (they collide on macOS/Windows file systems)
    Bad("duplicate_case_ids", RAW, mutate(_duplicate_ids, True),
        ("duplicate case ids 'Case_1', 'case_1'", "differ only in letter case", "rename all but one"),
        nothing_preprocessed),
    # ... without --verify they are two distinct cases on a case-sensitive file system (documented, exit 0)
    Bad("duplicate_case_ids_no_verify", RAW, mutate(_duplicate_ids), (), preprocessed_all, rc=0),
    Bad("empty_imagesTr", RAW, mutate(_empty_images, True),
        ("imagesTr/: holds no case", "numTraining=6", "add the training images"), nothing_preprocessed),
    Bad("empty_imagesTr_no_verify", RAW, mutate(_empty_images),
        ("no training cases found in imagesTr", "add the training images as CASE_XXXX.nii.gz"), nothing_preprocessed),
    # --- dataset.json
    Bad("dataset_json_invalid", RAW, mutate(lambda ws: (ws.ds / "dataset.json").write_text('{"labels": {')),
        ("dataset.json", "not valid JSON", "fix the syntax"), nothing_preprocessed),
    Bad("dataset_json_missing_key", RAW,
        mutate(lambda ws: h.edit_json(ws.ds / "dataset.json", lambda m: m.pop("labels"))),
        ("dataset.json", "required key 'labels' is missing", 'add it, e.g. "labels": {"background": 0'),
        nothing_preprocessed),
    Bad("dataset_json_wrong_types", RAW,
        mutate(lambda ws: h.edit_json(ws.ds / "dataset.json", lambda m: m.update(numTraining="6", file_ending=5))),
        ("dataset.json", "key 'numTraining' must be int, found str ('6')", '"numTraining": 24',
         "key 'file_ending' must be str", '"file_ending": ".nii.gz"'), nothing_preprocessed),
    Bad("dataset_json_missing", RAW, mutate(lambda ws: (ws.ds / "dataset.json").unlink()),
        ("dataset.json: file not found", "every dataset needs a dataset.json"), nothing_preprocessed),
    # --- unreadable paths. Tests run as root, where chmod 000 does not stop reading; instead a folder where a file
    # is expected and a path below a regular file (cannot be created: same errno family as no permission)
    Bad("directory_instead_of_image", RAW, mutate(_dir_for_file, True),
        ("imagesTr/" + I1, "is not a regular file", "remove it from imagesTr/"), nothing_preprocessed),
    Bad("directory_instead_of_image_no_verify", RAW, mutate(_dir_for_file),
        (I1, "cannot be read as an image", "is the file complete and a NIfTI/NRRD/MHA?"), nothing_preprocessed),
    Bad("preprocessed_folder_not_writable", RAW, _pp_under_file,
        ("not_a_folder/preprocessed", "Not a directory", "every folder on it is a folder (not a file)"),
        lambda ws: None),
    # --- reruns over existing preprocessed data
    Bad("bad_case_on_rerun", PP, _rerun_with_bad_case,
        (h.image(Path("imagesTr"), "phantom_003").name, "NaN", "replace them with finite values"),
        _rerun_bad_case_written),
    Bad("corrupt_fingerprint_json", PP, _corrupt_fingerprint,
        ("fingerprint.json: not valid JSON", "delete it to recompute"), lambda ws: None),
    # --- train
    Bad("plans_schema_version_99", PP, _plans_v99,
        ("plans.json", "schema_version 99 is not supported", "reads schema_version 1",
         "rerun `autoseg plan_and_preprocess`"), no_checkpoints),
    Bad("train_before_preprocessing", RAW, _train,
        ("plans.json: file not found", "run `autoseg plan_and_preprocess` first"), no_checkpoints),
    Bad("train_continue_without_checkpoint", PP, lambda ws: _train(ws, "--continue"),
        ("fold_0: no checkpoint_latest to continue from", "start without --continue"), no_checkpoints),
    Bad("corrupt_preprocessed_case", PP, _corrupt_preprocessed_case,
        ("case phantom_000: cannot read", "phantom_000.npy", "delete", "phantom_000.json and rerun "
         "`autoseg plan_and_preprocess`"), no_checkpoints),
    # --- predict
    Bad("predict_bad_cases_among_valid", TRAINED, _mixed_inputs,
        ("cut_0000.nii.gz: file is truncated or corrupt", "copy it again from the source",
         "nan_0000.nii.gz: holds 4 NaN", "replace them with finite values",
         "flat_0000.nii.gz: image is 2D", "autoseg needs 3D volumes",
         "readme.txt: not an image of the form CASE_XXXX.nii.gz", "4 problem(s)"), _mixed_written),
    Bad("predict_empty_input", TRAINED, _empty_input,
        ("empty: holds no images and no DICOM series", "-i takes a folder of CASE_0000.nii.gz images"), _no_pred_folder),
    Bad("predict_input_missing", TRAINED, lambda ws: _predict(ws, ws.root / "nowhere"),
        ("nowhere: not found", "-i takes a folder of CASE_0000.nii.gz images, a single image file"), _no_pred_folder),
    Bad("predict_input_is_file", TRAINED, _input_is_file,
        ("a_file: not an image file", "-i takes a folder", "or a DICOM series folder or zip"), _no_pred_folder),
    Bad("predict_without_checkpoints", TRAINED, _no_checkpoints,
        ("3d_fullres: no checkpoint_final", "trained: none", "train them or pick others with -f"), _no_pred_folder),
    Bad("predict_output_not_writable", TRAINED, _pred_under_file,
        ("a_file/pred", "Not a directory", "every folder on it is a folder (not a file)"), _no_pred_folder),
    # --- evaluate
    Bad("evaluate_prediction_missing", RAW, _eval_missing,
        ("1 of 2 case(s) have no prediction", "phantom_007", "predict them or remove their references"),
        lambda ws: no_evaluation(ws.root / "pred")),
    Bad("evaluate_prediction_wrong_shape", RAW, _eval_wrong_shape,
        ("case phantom_007", "pred/phantom_007.nii.gz: shape", "differs from reference",
         "predictions must lie on the reference grid"), lambda ws: no_evaluation(ws.root / "pred")),
    Bad("evaluate_output_not_writable", RAW, _eval_out_under_file,
        ("a_file/eval", "Not a directory", "every folder on it is a folder"),
        lambda ws: no_evaluation(ws.root / "pred")),
]


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=[b.id for b in BAD_INPUTS])
def test_bad_input(bad, cache, tmp_path, monkeypatch, capsys):
    ws = workspace(tmp_path, monkeypatch, cache, bad.parts)
    argv = bad.setup(ws)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == bad.rc, err
    assert "Traceback" not in err
    if bad.rc:
        assert "error: " in err, err  # after the progress bar, no traceback
    missing = [s for s in bad.expect if s not in err]
    assert not missing, f"{missing} not in:\n{err}"
    bad.written(ws)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file anyway (see the directory and "
                    "parent-is-a-file cases of the matrix)")
def test_unreadable_image_permission(cache, tmp_path, monkeypatch, capsys):
    ws = workspace(tmp_path, monkeypatch, cache, RAW)
    h.image(ws.ds).chmod(0)
    assert main(pp(False)) == 1
    err = capsys.readouterr().err
    assert I1 in err and "cannot be read" in err
    nothing_preprocessed(ws)


# ------------------------------------------------------------------------------------------- crash safety


def test_preprocess_killed_part_way_then_rerun_equals_uninterrupted(cache, tmp_path, monkeypatch):
    ws = workspace(tmp_path, monkeypatch, cache, RAW)
    for i in range(6):  # 24 cases, so the kill lands while cases are still being written
        for copy in range(3):
            case = f"copy{copy}_{i:03d}"
            shutil.copy(h.image(ws.ds, f"phantom_{i:03d}"), h.image(ws.ds, case))
            shutil.copy(h.label(ws.ds, f"phantom_{i:03d}"), h.label(ws.ds, case))
    h.edit_json(ws.ds / "dataset.json", lambda m: m.update(numTraining=24))
    folder = ws.pp / "3d_fullres"

    rc = h.run_and_kill(h.PREPROCESS_ARGS, ws.env(), lambda: bool(h.finished(folder, "*.json")), tmp_path / "log")
    assert rc == -9
    assert (ws.pp / "fingerprint.json").is_file()
    done_at_kill = len(h.finished(folder, "*.json"))
    assert 1 <= done_at_kill < 24, "not killed part-way"
    print(f"plan_and_preprocess killed with {done_at_kill} of 24 cases finished")
    (folder / ".tmp-deadbeef-phantom_000.npy").write_bytes(b"half")  # what a kill during a write leaves
    assert main(h.PREPROCESS_ARGS) == 0  # rerun: reuses the fingerprint, skips finished cases

    ref = h.Workspace(tmp_path / "ref").copy_from(ws, ["raw"])
    monkeypatch.setenv("AUTOSEG_PREPROCESSED", str(ref.pp_root))
    assert main(h.PREPROCESS_ARGS) == 0  # uninterrupted, in another folder

    assert not h.temporaries(ws.pp_root)
    assert (ws.pp / "fingerprint.json").read_bytes() == (ref.pp / "fingerprint.json").read_bytes()
    cases = sorted(p.name.removesuffix("_0000.nii.gz") for p in (ws.ds / "imagesTr").iterdir())
    assert len(cases) == 24
    for case in cases:
        for suffix in (".json", ".npy", "_seg.npy", "_fg.npz"):
            assert (folder / f"{case}{suffix}").is_file(), f"{case}{suffix} missing"
        for suffix in (".npy", "_seg.npy"):
            a = np.load(folder / f"{case}{suffix}", allow_pickle=False)
            b = np.load(ref.pp / "3d_fullres" / f"{case}{suffix}", allow_pickle=False)
            assert a.dtype == b.dtype and np.array_equal(a, b), f"{case}{suffix} differs"
        with np.load(folder / f"{case}_fg.npz") as fa, np.load(ref.pp / "3d_fullres" / f"{case}_fg.npz") as fb:
            assert sorted(fa.files) == sorted(fb.files)
            assert all(np.array_equal(fa[k], fb[k]) for k in fa.files)
        assert json.loads((folder / f"{case}.json").read_text()) == json.loads(
            (ref.pp / "3d_fullres" / f"{case}.json").read_text())


def test_train_killed_after_an_epoch_then_continue_equals_uninterrupted(cache, tmp_path, monkeypatch, capsys):
    ws = workspace(tmp_path, monkeypatch, cache, PP)
    fold = ws.res / "3d_fullres" / "fold_0"

    def epochs_logged() -> int:
        try:
            return len((fold / "log.jsonl").read_text().splitlines())
        except FileNotFoundError:
            return 0

    rc = h.run_and_kill(h.TRAIN_ARGS, ws.env(), lambda: epochs_logged() >= 1, tmp_path / "log")
    assert rc == -9
    assert not (fold / "checkpoint_final.safetensors").exists(), "not killed part-way"
    logged_at_kill = epochs_logged()
    (fold / ".tmp-deadbeef-checkpoint_latest.safetensors").write_bytes(b"half")  # a kill during a save

    capsys.readouterr()
    assert main(h.TRAIN_ARGS + ["--continue"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"continuing \S+fold_0 from epoch (\d+)", out)
    assert m, out
    resumed_from = int(m.group(1))
    print(f"train killed with {logged_at_kill} epoch(s) logged; --continue resumed from epoch {resumed_from}")
    # the last finished epoch (the checkpoint is saved just before the log line): only the epoch in flight is lost
    assert max(1, logged_at_kill) <= resumed_from <= logged_at_kill + 1
    assert [int(line.split()[1]) for line in out.splitlines() if line.startswith("epoch")] == list(
        range(resumed_from, 4))

    log = [json.loads(line) for line in (fold / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2, 3]
    assert not h.temporaries(ws.res_root)
    ref_fold = cache.res / "3d_fullres" / "fold_0"
    ref_log = [json.loads(line) for line in (ref_fold / "log.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in log] == [r["train_loss"] for r in ref_log]

    mine = load_file(str(fold / "checkpoint_final.safetensors"))
    ref = load_file(str(ref_fold / "checkpoint_final.safetensors"))
    assert mine.keys() == ref.keys()
    not_equal = [k for k in ref if not torch.equal(mine[k], ref[k])]
    assert not not_equal, f"weights differ from the uninterrupted run: {not_equal[:5]}"


def test_predict_killed_mid_folder_then_rerun_equals_uninterrupted(cache, tmp_path, monkeypatch):
    ws = workspace(tmp_path, monkeypatch, cache, TRAINED)
    inputs, out = cache.root / "small_in", ws.root / "pred"
    args = h.PREDICT_ARGS + ["-i", str(inputs), "-o", str(out)]

    rc = h.run_and_kill(args, ws.env(), lambda: bool(h.finished(out, "*.nii.gz")), tmp_path / "log")
    assert rc == -9
    done_at_kill = len(h.finished(out, "*.nii.gz"))
    assert 1 <= done_at_kill < N_SMALL, "not killed mid-folder"
    print(f"predict killed with {done_at_kill} of {N_SMALL} cases predicted")
    (out / ".tmp-deadbeef-small_007.nii.gz").write_bytes(b"half")  # a kill during a write leaves this

    assert main(args) == 0
    names = sorted(p.name for p in out.glob("*.nii.gz"))
    assert names == [f"small_{i:03d}.nii.gz" for i in range(N_SMALL)]
    records = [f"small_{i:03d}.model.json" for i in range(N_SMALL)]  # the model of each, written after it
    assert sorted(p.name for p in out.iterdir()) == sorted(names + records)  # all there, no temporaries
    for name in names:
        a, ga = read_image(out / name)
        b, gb = read_image(cache.root / "small_ref" / name)
        assert ga == gb and a.dtype == b.dtype and np.array_equal(a, b), name


# ------------------------------------------------------------------------------------ out of memory / dead worker


def test_memory_error_in_worker_is_reported_by_case_name():
    cases = [Case(c, (Path(f"{c}_0000.nii.gz"),), None) for c in "abc"]
    results = map_cases(h.memory_error_on_b, cases, num_workers=2, progress=False)
    assert results[0] == ("a", None) and results[2] == ("c", None)
    value, message = results[1]
    assert value is None
    assert message.startswith("case b: out of memory") and "lower -np" in message


def test_dead_worker_names_unfinished_items_and_the_likely_cause():
    with pytest.raises(AutosegError) as info:
        map_cases(h.die_on_c, ["a", "b", "c", "d", "e"], num_workers=2, desc="preprocess", progress=False)
    text = str(info.value)
    assert "worker process died abruptly" in text and "most likely out of memory" in text
    assert "while running preprocess" in text
    unfinished = re.search(r"did not finish: (.*)\. Rerun", text).group(1).split(", ")
    assert "c" in unfinished and len(unfinished) < 5  # at least one item finished before c killed its worker
    assert "lower -np" in text
