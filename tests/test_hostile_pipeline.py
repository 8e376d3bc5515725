"""Hostile inputs and faults against a trained tiny model: full disks, hostile bundles, huge voxel grids, edited raw
data, orphaned workers, damaged training state.

Everything runs on the 6-case small phantom and the tiny network of ``robustness_helpers`` (patch 16x32x32),
trained once per module with ``--encoder residual`` (so that model must also predict); each test works on a copy.
Every case must end in a named error (exit 1) or a correct result, with nothing half-written that looks finished.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file, save_file

import robustness_helpers as h
from autoseg.cli import main
from autoseg.phantom import write_dataset

N_INPUTS = 4
TRAIN = h.TRAIN_ARGS[:h.TRAIN_ARGS.index("--epochs")] + ["--epochs", "2", "--iters-per-epoch", "2", "--val-iters",
                                                         "1", "--num-workers", "0", "--no-validation", "--device",
                                                         "cpu", "--encoder", "residual"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Raw phantom, tiny plans, fold 0 trained with --encoder residual, small inputs and their predictions."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    ws = h.Workspace(tmp_path_factory.mktemp("hostile"))
    write_dataset(ws.raw_root, 6, seed=7, size="small", num_test=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        for k, v in ws.env_vars().items():
            mp.setenv(k, v)
        assert main(h.PREPROCESS_ARGS) == 0
        h.shrink_plans(ws.pp / "plans.json")
        assert main(TRAIN) == 0
        h.small_inputs(sorted((ws.ds / "imagesTs").iterdir()), ws.root / "inputs", N_INPUTS)
        assert main(h.PREDICT_ARGS + ["-i", str(ws.root / "inputs"), "-o", str(ws.root / "reference")]) == 0
    yield ws
    torch.set_num_threads(before)


@pytest.fixture()
def ws(trained, tmp_path, monkeypatch) -> h.Workspace:
    copy = h.Workspace(tmp_path / "ws").copy_from(trained, ["raw", "pp", "res"])
    for part in ("inputs", "reference"):
        (copy.root / part).symlink_to(trained.root / part)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for k, v in copy.env_vars().items():
        monkeypatch.setenv(k, v)
    return copy


def predict(ws: h.Workspace, out: Path, *extra: str, inputs: Path | None = None) -> list[str]:
    return h.PREDICT_ARGS + ["-i", str(inputs or ws.root / "inputs"), "-o", str(out), *extra]


def same_as_reference(ws: h.Workspace, out: Path) -> None:
    names = sorted(p.name for p in (ws.root / "reference").glob("*.nii.gz"))
    assert sorted(p.name for p in out.glob("*.nii.gz")) == names
    for name in names:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(out / name)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(ws.root / "reference" / name)))
        assert np.array_equal(a, b), name


def all_outputs_complete(out: Path) -> None:
    """Nothing half-written: no temporaries, and every output reads back to its end."""
    assert not h.temporaries(out)
    for p in out.glob("*.nii.gz"):
        assert p.stat().st_size > 0, p
        sitk.ReadImage(str(p))


# ------------------------------------------------------------------------------------------------ model substitution


def test_residual_encoder_is_recorded_so_the_model_predicts(ws):
    plans = json.loads((ws.res / "3d_fullres" / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["network"]["encoder"] == "residual"
    assert len(list((ws.root / "reference").glob("*.nii.gz"))) == N_INPUTS  # predicted by the fixture, exit 0


@pytest.mark.parametrize("where", ["/abs/path/3d_fullres", "../Dataset502_Other/3d_fullres"])
def test_inference_plan_leading_outside_is_refused(ws, where, capsys):
    (ws.res / "inference_plan.json").write_text(json.dumps(
        {"configurations": [where], "folds": {where: ["0"]}, "postprocessing": {}}))
    args = [a for a in predict(ws, ws.root / "pred") if a not in ("-c", "3d_fullres")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "inference_plan.json" in err and where in err and not (ws.root / "pred").exists()


def test_bundle_with_outside_configuration_is_refused(ws, capsys):
    (ws.res / "inference_plan.json").write_text(json.dumps(
        {"configurations": ["/abs/path/3d_fullres"], "folds": {"3d_fullres": ["0"]}, "postprocessing": {}}))
    assert main(["export", "-d", h.NAME, "-o", str(ws.root / "model.zip")]) == 0
    assert main(["predict", "-i", str(ws.root / "inputs"), "-o", str(ws.root / "pred"), "-m",
                 str(ws.root / "model.zip"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "model.zip" in err and "inference_plan.json" in err and "/abs/path/3d_fullres" in err
    assert not (ws.root / "pred").exists()


@pytest.mark.parametrize("via", ["results", "bundle"])
def test_weights_of_the_wrong_shape(ws, via, capsys):
    final = ws.res / "3d_fullres" / "fold_0" / "checkpoint_final.safetensors"
    weights = load_file(str(final))
    name = next(iter(weights))
    weights[name] = torch.zeros(tuple(s + 1 for s in weights[name].shape))
    save_file(weights, str(final))
    extra = []
    if via == "bundle":
        assert main(["export", "-d", h.NAME, "-o", str(ws.root / "model.zip")]) == 0
        extra = ["-m", str(ws.root / "model.zip")]
    args = predict(ws, ws.root / "pred", *extra)
    if via == "bundle":
        args = [a for a in args if a not in ("-d", "501")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "checkpoint_final.safetensors" in err and "wrong shape" in err and name in err
    assert not list((ws.root / "pred").glob("*.nii.gz")) if (ws.root / "pred").exists() else True


# ------------------------------------------------------------------------------------------------ disk full


def test_disk_full_writer_that_hides_enospc(ws, monkeypatch, capsys):
    """SimpleITK's gzip writer leaves a 0-byte .nii.gz on a full disk and reports success: simulated here."""
    import autoseg.io.images as images

    real = images.sitk.WriteImage
    written = []

    def full_disk(image, path, *args):
        if len(written) >= 2:  # the disk fills up after two outputs
            Path(path).write_bytes(b"")
            return
        written.append(path)
        real(image, path, *args)

    out = ws.root / "pred"
    monkeypatch.setattr(images.sitk, "WriteImage", full_disk)
    assert main(predict(ws, out)) == 1
    err = capsys.readouterr().err
    assert "the write produced an empty file" in err and "disk is probably full" in err
    all_outputs_complete(out)
    assert len(list(out.glob("*.nii.gz"))) == 2
    monkeypatch.setattr(images.sitk, "WriteImage", real)
    assert main(predict(ws, out)) == 0  # the rerun redoes exactly the missing cases
    same_as_reference(ws, out)


def test_disk_full_on_a_real_small_tmpfs(ws, capsys):
    out = ws.root / "tmpfs"
    out.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(out)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the simulated ENOSPC test covers the writer")
    try:
        rc = main(predict(ws, out, "--save-probabilities"))
        err = capsys.readouterr().err
        assert rc == 1, err
        assert "No space left on device" in err or "disk is probably full" in err, err
        all_outputs_complete(out)
        subprocess.run(["mount", "-o", "remount,size=4m", str(out)], check=True)
        assert main(predict(ws, out, "--save-probabilities")) == 0
        same_as_reference(ws, out)
    finally:
        subprocess.run(["umount", str(out)], check=False)


def test_output_truncated_after_the_run_is_redone(ws):
    out = ws.root / "pred"
    assert main(predict(ws, out)) == 0
    victim = sorted(out.glob("*.nii.gz"))[0]
    victim.write_bytes(victim.read_bytes()[:20])  # looks finished by name only
    assert main(predict(ws, out)) == 0
    same_as_reference(ws, out)


def test_input_replaced_after_prediction_is_predicted_again(ws, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for p in (ws.root / "inputs").iterdir():
        (inputs / p.name).write_bytes(p.read_bytes())
    out = ws.root / "pred"
    assert main(predict(ws, out, inputs=inputs)) == 0
    first = sorted(inputs.iterdir())[0]
    h.rewrite_array(first, lambda a: a[:, :, ::-1].copy())  # another image under the same name
    assert main(predict(ws, out, inputs=inputs)) == 0
    assert main(predict(ws, ws.root / "fresh", inputs=inputs)) == 0
    name = first.name.replace("_0000", "")
    rerun, fresh = (sitk.GetArrayFromImage(sitk.ReadImage(str(d / name))) for d in (out, ws.root / "fresh"))
    stale = sitk.GetArrayFromImage(sitk.ReadImage(str(ws.root / "reference" / name)))
    assert not np.array_equal(stale, fresh)  # else this test could not tell stale from redone
    assert np.array_equal(rerun, fresh)  # the new image's prediction, not the stale one


# ------------------------------------------------------------------------------------------------ memory


def test_huge_resampled_grid_is_refused_and_the_others_are_predicted(ws, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for p in (ws.root / "inputs").iterdir():
        (inputs / p.name).write_bytes(p.read_bytes())
    huge = inputs / "huge_0000.nii.gz"
    img = sitk.ReadImage(str(next(iter(sorted((ws.root / "inputs").iterdir())))))
    img.SetSpacing((1000.0, 1000.0, 1000.0))  # a mistaken header: metres written as millimetres
    sitk.WriteImage(img, str(huge))
    out = ws.root / "pred"
    assert main(predict(ws, out, inputs=inputs)) == 1
    err = capsys.readouterr().err
    assert "case huge" in err and "GiB of memory" in err and "check the spacing in the image header" in err
    assert not (out / "huge.nii.gz").exists()
    same_as_reference(ws, out)  # every good case predicted


# ------------------------------------------------------------------------------------------------ stale work


def test_raw_label_edited_after_preprocessing_is_redone(ws, capsys):
    seg_file = ws.pp / "3d_fullres" / "phantom_001_seg.npy"
    before = np.load(seg_file)
    fp_before = (ws.pp / "fingerprint.json").read_bytes()
    h.rewrite_array(h.label(ws.ds, "phantom_001"), lambda a: np.zeros_like(a))
    assert main(h.PREPROCESS_ARGS) == 0
    out = capsys.readouterr().out
    assert "raw files changed" in out and "phantom_001" in out
    after = np.load(seg_file)
    assert before.any() and not after.any()  # the edited (empty) label, not the stale one
    assert (ws.pp / "fingerprint.json").read_bytes() != fp_before


def test_regions_class_order_longer_than_regions_is_refused_before_training(ws, capsys):
    meta = json.loads((ws.ds / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "liver": [1, 2], "liver_tumor": 2, "kidney": [3, 4], "kidney_tumor": 4}
    meta["regions_class_order"] = [1, 2, 3, 4, 5]
    (ws.ds / "dataset.json").write_text(json.dumps(meta))
    assert main(h.PREPROCESS_ARGS + ["--verify"]) == 1
    assert "one value per region" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ training faults


def test_failure_after_training_leaves_no_final_checkpoint(ws, monkeypatch, capsys):
    import autoseg.training.trainer as trainer

    def broken(*args, **kwargs):
        raise trainer.AutosegError("validation failed")

    monkeypatch.setattr(trainer, "validate_fold", broken)
    args = [a for a in TRAIN if a != "--no-validation"]
    args[args.index("--epochs") + 1] = "1"
    assert main(args) == 1
    assert "validation failed" in capsys.readouterr().err
    assert not (ws.res / "3d_fullres" / "fold_0" / "checkpoint_final.safetensors").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_training_state_on_continue(ws, damage, capsys):
    state = ws.res / "3d_fullres" / "fold_0" / "checkpoint_latest.state.pt"
    state.write_bytes(b"not a zip at all" if damage == "garbage" else state.read_bytes()[:1000])
    assert main(TRAIN + ["--continue"]) == 1
    err = capsys.readouterr().err
    assert "checkpoint_latest.state.pt: not a readable training state" in err and "without --continue" in err


def test_hand_edited_splits_fold_missing(ws, capsys):
    splits = json.loads((ws.res / "splits.json").read_text())
    (ws.res / "splits.json").write_text(json.dumps(splits[:1]))
    args = list(TRAIN)
    args[args.index("-f") + 1] = "3"
    assert main(args) == 1
    assert "holds 1 fold(s), so there is no fold 3" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ orphaned workers

WORKERS_SCRIPT = textwrap.dedent("""
    import time
    from autoseg.parallel import map_cases

    def nap(x):
        time.sleep(300)
        return x

    if __name__ == "__main__":
        map_cases(nap, [1, 2], num_workers=2, progress=False)
""")


def _children(pid: int) -> set[int]:
    try:
        return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_workers_die_with_a_killed_parent(tmp_path):
    script = tmp_path / "workers.py"
    script.write_text(WORKERS_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while len(_children(parent.pid)) < 2:  # both workers started (and the resource tracker, maybe)
            assert parent.poll() is None and time.monotonic() < deadline, "the workers never started"
            time.sleep(0.05)
        time.sleep(0.5)  # let the workers pick up their item
        workers = _children(parent.pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 60
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "worker processes outlived their killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        for w in _children(parent.pid):
            os.kill(w, signal.SIGKILL)
