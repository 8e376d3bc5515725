"""Hostile and careless inputs that need no trained model: out-of-range flags, corrupt and edited JSON, exit codes.

Each case must end in a named error (exit 1 with the file or flag, the value and a fix; exit 2 for usage) or a
correct result, never a traceback, a hang or a silent wrong result. ``hypothesis`` fuzzes the flag parsers and the
JSON reader: whatever the text, the outcome is a value in range or a named error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoseg.checkpoint import fit_weights, save_checkpoint
from autoseg.cli import build_parser, main
from autoseg.errors import AutosegError, DatasetError
from autoseg.inference.predictor import tile_starts
from autoseg.io.dataset import load_dataset_json
from autoseg.jsonfile import MAX_DEPTH, parse_json, read_json
from autoseg.labels import LabelSpec
from autoseg.layout import inside
from autoseg.pipeline import inference_models
from autoseg.training.splits import load_or_create_splits

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# ------------------------------------------------------------------------------------------------ flags

TRAIN = ["train", "-d", "501", "-f", "0"]
PREDICT = ["predict", "-i", "in", "-o", "out", "-d", "501"]

BAD_FLAGS = [  # (argv, flag, value): each must be a usage error naming both, before anything runs
    (TRAIN + ["--epochs", "-1"], "--epochs", "'-1'"),
    (TRAIN + ["--epochs", "0"], "--epochs", "'0'"),
    (TRAIN + ["--iters-per-epoch", "0"], "--iters-per-epoch", "'0'"),
    (TRAIN + ["--val-iters", "-3"], "--val-iters", "'-3'"),
    (TRAIN + ["--time-budget", "-5"], "--time-budget", "'-5'"),
    (TRAIN + ["--time-budget", "inf"], "--time-budget", "'inf'"),
    (TRAIN + ["--lr", "nan"], "--lr", "'nan'"),
    (TRAIN + ["--lr", "0"], "--lr", "'0'"),
    (TRAIN + ["--lr", "-0.01"], "--lr", "'-0.01'"),
    (TRAIN + ["--lr", "1e9"], "--lr", "'1e9'"),
    (TRAIN + ["--seed", "-1"], "--seed", "'-1'"),
    (TRAIN + ["--num-workers", "-2"], "--num-workers", "'-2'"),
    (PREDICT + ["--step", "0"], "--step", "'0'"),
    (PREDICT + ["--step", "-1"], "--step", "'-1'"),
    (PREDICT + ["--step", "1.5"], "--step", "'1.5'"),
    (PREDICT + ["--step", "nan"], "--step", "'nan'"),
    (PREDICT + ["-f", "../../etc"], "-f", "'../../etc'"),
    (["plan_and_preprocess", "-d", "501", "-np", "0"], "-np", "'0'"),
    (["plan_and_preprocess", "-d", "501", "--gpu-memory-gb", "-8"], "--gpu-memory-gb", "'-8'"),
    (["import", "model.zip", "--max-gb", "nan"], "--max-gb", "'nan'"),
    (["evaluate", "-ref", "a", "-pred", "b", "--tolerance-mm", "-1"], "--tolerance-mm", "'-1'"),
    (["phantom", "-o", "x", "--name", "../escape"], "--name", "'../escape'"),
    (["phantom", "-o", "x", "--cases", "10000000"], "--cases", "'10000000'"),
    (["demo", "--time-budget", "0"], "--time-budget", "'0'"),
]


@pytest.mark.parametrize("argv,flag,value", BAD_FLAGS, ids=[f"{a[0]} {f} {v}" for a, f, v in BAD_FLAGS])
def test_out_of_range_flags_are_usage_errors(argv, flag, value, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert f"argument {flag}" in err and value in err and "give e.g." in err or "a fold" in err, err


def _flag_types() -> dict[str, object]:
    """Every typed numeric flag of train and predict, by its option string."""
    sub = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001 (argparse keeps them here)
    out = {}
    for command in ("train", "predict", "plan_and_preprocess"):
        for action in sub[command]._actions:
            if action.type is not None and action.option_strings:
                out[f"{command} {action.option_strings[-1]}"] = action.type
    return out


FLAG_TYPES = _flag_types()


@FUZZ
@given(text=st.one_of(st.text(max_size=12), st.floats().map(repr), st.integers().map(str)))
def test_flag_parsers_return_a_value_in_range_or_a_named_error(text):
    import argparse

    for name, parse in FLAG_TYPES.items():
        try:
            value = parse(text)
        except argparse.ArgumentTypeError as e:
            assert repr(text) in str(e), name  # the message quotes the value
            continue
        if isinstance(value, float):
            assert math.isfinite(value), (name, text)
        if isinstance(value, (int, float)):
            assert value >= 0, (name, text)


# ------------------------------------------------------------------------------------------------ exit codes


def test_internal_error_exits_3_with_one_line_and_traceback_only_with_debug(monkeypatch, capsys):
    def bug(_args):
        raise KeyError("configurations")

    import autoseg.cli.stages as stages

    monkeypatch.setattr(stages.pipeline, "find_best", lambda *a: bug(a))
    assert main(["find_best_configuration", "-d", "Dataset501_X"]) == 3
    err = capsys.readouterr().err
    assert "internal error (a bug in autoseg" in err and "KeyError" in err and "--debug" in err
    assert "Traceback" not in err
    assert main(["find_best_configuration", "-d", "Dataset501_X", "--debug"]) == 3
    assert "Traceback" in capsys.readouterr().err
    assert main(["--debug", "find_best_configuration", "-d", "Dataset501_X"]) == 3
    assert "Traceback" in capsys.readouterr().err


def test_input_error_exits_1_and_usage_exits_2(roots, capsys):
    assert main(["find_best_configuration", "-d", "Dataset501_X"]) == 1
    assert "error: " in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["train", "-d", "501"])  # -f missing
    assert info.value.code == 2


# ------------------------------------------------------------------------------------------------ JSON reader


def _write(tmp_path: Path, text: str | bytes, name: str = "x.json") -> Path:
    p = tmp_path / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


CORRUPT_JSON = [
    ("truncated", '{"a": [1, 2', "not valid JSON"),
    ("empty", "", "not valid JSON"),
    ("nan", '{"a": NaN}', "NaN is not valid JSON"),
    ("infinity", '[Infinity]', "Infinity is not valid JSON"),
    ("deep", "[" * 100_000 + "]" * 100_000, "levels deep"),
    ("deep_in_object", '{"a": ' * 50 + "1" + "}" * 50, "levels deep"),
    ("latin1", b'{"name": "\xe9"}', "not UTF-8"),
]


@pytest.mark.parametrize("name,text,message", CORRUPT_JSON, ids=[c[0] for c in CORRUPT_JSON])
def test_corrupt_json_is_a_named_error(tmp_path, name, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(AutosegError) as info:
        read_json(path, "the fix")
    assert str(path) in str(info.value) and message in str(info.value) and "the fix" in str(info.value)


def test_brackets_inside_strings_do_not_count_as_depth(tmp_path):
    assert read_json(_write(tmp_path, json.dumps({"s": "[" * 1000 + '\\"{' * 100})), "fix")["s"].startswith("[[")


def test_missing_folder_and_oversized_json(tmp_path, monkeypatch):
    with pytest.raises(AutosegError, match="file not found; fix"):
        read_json(tmp_path / "nope.json", "fix")
    with pytest.raises(AutosegError, match="is a folder"):
        read_json(tmp_path, "fix")
    monkeypatch.setattr("autoseg.jsonfile.MAX_JSON_BYTES", 10)
    with pytest.raises(AutosegError, match="more than the 10"):
        read_json(_write(tmp_path, json.dumps({"a": "0123456789"})), "fix")


@FUZZ
@given(raw=st.one_of(st.binary(max_size=200), st.text(alphabet='[]{}",:0123456789aeflnrstu\\ ', max_size=200)))
def test_json_reader_never_raises_anything_but_a_named_error(raw):
    try:
        parse_json(raw, "fuzz.json", "fix")
    except AutosegError as e:
        assert str(e).startswith("fuzz.json: ")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 300) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["train", "val", "configurations", "folds", "postprocessing", "x", "0"]), inner, max_size=4),
    max_leaves=12)


@FUZZ
@given(obj=JSON_VALUES)
def test_schemas_accept_or_name_every_edited_file(obj):
    for kind in ("splits", "inference_plan", "case_properties", "validation_summary", "plans", "fingerprint"):
        try:
            parse_json(json.dumps(obj), f"{kind}.json", "fix", kind)
        except AutosegError as e:
            assert str(e).startswith(f"{kind}.json: ")


# ------------------------------------------------------------------------------------------------ edited files

SPLITS_EDITS = [
    ("truncated", '[{"train": ["a"], "val": ', "not valid JSON"),
    ("not_a_list", '{"train": ["a"], "val": ["b"]}', "splits does not match its schema"),
    ("missing_val", '[{"train": ["a", "b"]}]', "'val' is a required property"),
    ("empty_val", '[{"train": ["a", "b"], "val": []}]', "should be non-empty"),
    ("unknown_case", '[{"train": ["a"], "val": ["zzz"]}]', "are not preprocessed"),
    ("overlap", '[{"train": ["a", "b"], "val": ["b"]}]', "validate on cases they also train on"),
    ("fold_out_of_range", '[{"train": ["a"], "val": ["b"]}]', "there is no fold 3"),
]


@pytest.mark.parametrize("name,text,message", SPLITS_EDITS, ids=[s[0] for s in SPLITS_EDITS])
def test_hand_edited_splits(tmp_path, name, text, message):
    path = _write(tmp_path, text, "splits.json")
    with pytest.raises(AutosegError) as info:
        load_or_create_splits(path, ["a", "b", "c"], 3)
    assert str(path) in str(info.value) and message in str(info.value), str(info.value)


def _results(tmp_path: Path, plan: object) -> Path:
    ds = tmp_path / "Dataset501_X"
    (ds / "3d_fullres" / "fold_0").mkdir(parents=True)
    (ds / "inference_plan.json").write_text(plan if isinstance(plan, str) else json.dumps(plan))
    return ds


GOOD_PLAN = {"configurations": ["3d_fullres"], "folds": {"3d_fullres": ["0"]}, "postprocessing": {}}
PLAN_EDITS = [
    ("absolute_configuration", {**GOOD_PLAN, "configurations": ["/abs/path/3d_fullres"]}, "does not match"),
    ("parent_configuration", {**GOOD_PLAN, "configurations": ["../Dataset502_Y/3d_fullres"]}, "does not match"),
    ("escaping_fold", {**GOOD_PLAN, "folds": {"3d_fullres": ["../../x"]}}, "does not match"),
    ("missing_folds", {"configurations": ["3d_fullres"], "postprocessing": {}}, "'folds' is a required property"),
    ("empty_configurations", {**GOOD_PLAN, "configurations": []}, "should be non-empty"),
    ("truncated", '{"configurations": ["3d_fu', "not valid JSON"),
    ("bad_postprocessing", {**GOOD_PLAN, "postprocessing": {"largest_component_labels": [-1]}}, "minimum"),
]


@pytest.mark.parametrize("name,plan,message", PLAN_EDITS, ids=[p[0] for p in PLAN_EDITS])
def test_hand_edited_inference_plan(tmp_path, name, plan, message):
    ds = _results(tmp_path, plan)
    with pytest.raises(AutosegError) as info:
        inference_models(ds, None, None, False)
    assert "inference_plan.json" in str(info.value) and message in str(info.value), str(info.value)


def test_symlinked_configuration_leading_outside_is_refused(tmp_path):
    ds = _results(tmp_path, {**GOOD_PLAN, "configurations": ["linked"], "folds": {"linked": ["0"]}})
    (tmp_path / "elsewhere").mkdir()
    (ds / "linked").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(AutosegError, match="leads outside"):
        inference_models(ds, None, None, False)
    assert inside(ds, "3d_fullres", "test") == ds / "3d_fullres"


DATASET_EDITS = [
    ("rco_longer_than_regions", {"labels": {"background": 0, "kidney": [1, 2], "tumour": 2},
                                 "regions_class_order": [1, 2, 3]}, "one value per region"),
    ("rco_not_a_list", {"labels": {"background": 0, "kidney": [1, 2], "tumour": 2},
                        "regions_class_order": "1,2"}, "must be a list"),
    ("file_ending_path", {"file_ending": "/../../x.nii.gz"}, "'file_ending' must start with '.'"),
    ("file_ending_traversal", {"file_ending": "./../x"}, "'file_ending' must start with '.'"),
]


@pytest.mark.parametrize("name,edit,message", DATASET_EDITS, ids=[d[0] for d in DATASET_EDITS])
def test_hand_edited_dataset_json(tmp_path, name, edit, message):
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "numTraining": 1,
            "file_ending": ".nii.gz", **edit}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError) as info:
        load_dataset_json(tmp_path)
    assert message in str(info.value), str(info.value)


def test_regions_class_order_checked_where_labels_are_used():
    meta = {"labels": {"background": 0, "kidney": [1, 2], "tumour": 2}, "regions_class_order": [1, 2, 3]}
    with pytest.raises(AutosegError, match="one value per region"):
        LabelSpec.from_meta(meta).layout()


# ------------------------------------------------------------------------------------------------ weights


def test_weights_of_the_wrong_shape_or_nan_are_named_errors(tmp_path):
    model = torch.nn.Conv3d(1, 2, 3)
    wrong = {"weight": torch.zeros(3, 1, 3, 3, 3), "bias": torch.zeros(3)}
    with pytest.raises(AutosegError, match=r"wrong shape \['weight \(3, 1, 3, 3, 3\)"):
        fit_weights(model, wrong, tmp_path / "w.safetensors")
    nan = {k: torch.full_like(v, float("nan")) for k, v in model.state_dict().items()}
    with pytest.raises(AutosegError, match="NaN/Inf"):
        fit_weights(model, nan, tmp_path / "w.safetensors")
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    with pytest.raises(AutosegError, match="training diverged"):
        save_checkpoint(tmp_path, "final", model)
    assert not list(tmp_path.iterdir())  # nothing that looks finished


@pytest.mark.parametrize("step", [0.0, -1.0, 1.5, float("nan")])
def test_sliding_window_step_out_of_range_is_refused_in_the_api_too(step):
    with pytest.raises(AutosegError, match="step"):
        tile_starts(100, 32, step)


@pytest.mark.parametrize("step", [0.1, 0.5, 1.0])
def test_every_voxel_is_covered_for_valid_steps(step):
    covered = np.zeros(100, bool)
    for s in tile_starts(100, 32, step):
        covered[s:s + 32] = True
    assert covered.all()
