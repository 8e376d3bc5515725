"""Model bundles: export/import round trip, and every way a hostile or damaged zip must be refused."""

from __future__ import annotations

import hashlib
import json
import stat
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from autoseg.bundle import export_bundle, import_bundle, open_bundle, read_manifest
from autoseg.cli.bundle import add_cli
from autoseg.errors import AutosegError

REPO = Path(__file__).resolve().parents[1]
DATASET = "Dataset501_Test"


@pytest.fixture()
def results(tmp_path) -> Path:
    """A hand-made results folder: 3d_fullres with fold_0 finished and fold_1 unfinished."""
    ds = tmp_path / "results" / DATASET
    cfg = ds / "3d_fullres"
    (cfg / "fold_0").mkdir(parents=True)
    (cfg / "fold_1").mkdir()
    (cfg / "plans.json").write_text((REPO / "plans" / "demo_phantom.json").read_text())
    (cfg / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
                                                  "numTraining": 2, "file_ending": ".nii.gz"}))
    save_file({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(3)},
              str(cfg / "fold_0" / "checkpoint_final.safetensors"))
    save_file({"w": torch.zeros(2)}, str(cfg / "fold_1" / "checkpoint_latest.safetensors"))
    (cfg / "fold_0" / "log.jsonl").write_text("{}\n")  # not part of a bundle
    (ds / "inference_plan.json").write_text(json.dumps({"configurations": ["3d_fullres"], "folds": {"3d_fullres": ["0"]},
                                                        "postprocessing": {}}))
    return ds


@pytest.fixture()
def bundle(results, tmp_path) -> Path:
    return export_bundle(results, tmp_path / "model.zip", None, None, None)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _make_zip(path: Path, members: dict[str, bytes], manifest_extra: dict[str, bytes] | None = None,
              infos: dict[str, zipfile.ZipInfo] | None = None) -> Path:
    """A zip of ``members`` plus a manifest that lists them (and ``manifest_extra``) with correct hashes."""
    listed = {**members, **(manifest_extra or {})}
    files = {}
    for name, data in listed.items():
        rel = name.split("/", 1)[1] if name.startswith(DATASET + "/") else name
        files[rel] = {"sha256": _sha(data), "bytes": len(data)}
    manifest = {"autoseg_version": "0.1.0", "dataset": DATASET, "created_utc": "2024-01-01T00:00:00Z",
                "files": files}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr((infos or {}).get(name, name), data)
        zf.writestr(f"{DATASET}/manifest.json", json.dumps(manifest))
    return path


def _members(zip_path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(zip_path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def _good_members(bundle: Path) -> dict[str, bytes]:
    return {k: v for k, v in _members(bundle).items() if not k.endswith("manifest.json")}


def _assert_nothing_installed(results_root: Path) -> None:
    assert not results_root.exists() or not any(results_root.iterdir()), list(results_root.iterdir())


# ---------------------------------------------------------------------------------------------------- export


def test_export_contents_and_manifest(bundle, results):
    members = _members(bundle)
    assert sorted(members) == sorted(f"{DATASET}/{r}" for r in [
        "inference_plan.json", "3d_fullres/plans.json", "3d_fullres/dataset.json",
        "3d_fullres/fold_0/checkpoint_final.safetensors", "manifest.json"])
    manifest = json.loads(members[f"{DATASET}/manifest.json"])
    assert manifest["dataset"] == DATASET and manifest["autoseg_version"] == "0.1.0"
    assert manifest["created_utc"].endswith("Z")
    assert len(manifest["files"]) == 4
    for rel, entry in manifest["files"].items():
        data = (results / rel).read_bytes()
        assert entry == {"sha256": _sha(data), "bytes": len(data)}
        assert members[f"{DATASET}/{rel}"] == data
    assert read_manifest(bundle) == manifest
    assert [p.name for p in bundle.parent.iterdir() if p.name.startswith(".tmp-")] == []


def test_export_with_fingerprint_and_explicit_selection(results, tmp_path):
    fp = tmp_path / "fingerprint.json"
    fp.write_text('{"dataset": "x"}')
    out = export_bundle(results, tmp_path / "m.zip", ["3d_fullres"], ["fold_0"], fp)
    assert _members(out)[f"{DATASET}/fingerprint.json"] == fp.read_bytes()


def test_export_of_a_cascade_brings_its_first_stage(results, tmp_path):
    for name in ("3d_cascade", "3d_lowres"):
        cfg = results / name
        (cfg / "fold_0").mkdir(parents=True)
        for f in ("plans.json", "dataset.json"):
            (cfg / f).write_text((results / "3d_fullres" / f).read_text())
        save_file({"w": torch.ones(2)}, str(cfg / "fold_0" / "checkpoint_final.safetensors"))
    members = _members(export_bundle(results, tmp_path / "m.zip", ["3d_cascade"], ["0"], None))
    assert f"{DATASET}/3d_lowres/fold_0/checkpoint_final.safetensors" in members
    assert not any(m.startswith(f"{DATASET}/3d_fullres/") for m in members)


def test_export_unfinished_fold_is_an_error(results, tmp_path):
    with pytest.raises(AutosegError, match=r"fold 1 .*train it to the end or leave it out with -f"):
        export_bundle(results, tmp_path / "m.zip", None, ["1"], None)
    assert not (tmp_path / "m.zip").exists()


def test_export_errors(results, tmp_path):
    with pytest.raises(AutosegError, match="no such configuration"):
        export_bundle(results, tmp_path / "m.zip", ["2d"], None, None)
    with pytest.raises(AutosegError, match="no such results folder"):
        export_bundle(tmp_path / "nowhere", tmp_path / "m.zip", None, None, None)
    (results / "3d_fullres" / "fold_0" / "checkpoint_final.safetensors").unlink()
    with pytest.raises(AutosegError, match="no configuration has a fold"):
        export_bundle(results, tmp_path / "m.zip", None, None, None)


# ---------------------------------------------------------------------------------------------------- import


def test_round_trip_is_byte_identical(bundle, results, tmp_path):
    root = tmp_path / "imported"
    folder = import_bundle(bundle, root)
    assert folder == root / DATASET
    got = _files(folder)
    manifest = json.loads(got.pop("manifest.json"))
    assert got == {rel: (results / rel).read_bytes() for rel in manifest["files"]}
    assert [p.name for p in root.iterdir()] == [DATASET]  # no temporaries left


def test_existing_target_needs_overwrite(bundle, tmp_path):
    root = tmp_path / "imported"
    (root / DATASET).mkdir(parents=True)
    (root / DATASET / "old.txt").write_text("old")
    with pytest.raises(AutosegError, match="already exists; pass --overwrite"):
        import_bundle(bundle, root)
    assert (root / DATASET / "old.txt").exists()
    folder = import_bundle(bundle, root, overwrite=True)
    assert not (folder / "old.txt").exists()
    assert (folder / "3d_fullres" / "plans.json").is_file()
    assert [p.name for p in root.iterdir()] == [DATASET]


def test_open_bundle(bundle):
    folder = open_bundle(bundle)
    assert folder.name == DATASET
    plans = json.loads((folder / "3d_fullres" / "plans.json").read_text())
    assert "configurations" in plans
    assert (folder / "3d_fullres" / "fold_0" / "checkpoint_final.safetensors").is_file()


def test_tampered_member_names_it_and_installs_nothing(bundle, tmp_path):
    members = _members(bundle)
    name = f"{DATASET}/3d_fullres/fold_0/checkpoint_final.safetensors"
    data = bytearray(members[name])
    data[-1] ^= 0xFF  # a tensor byte: header still parses, CRC is recomputed by zipfile, only the hash catches it
    members[name] = bytes(data)
    tampered = tmp_path / "tampered.zip"
    with zipfile.ZipFile(tampered, "w") as zf:
        for n, d in members.items():
            zf.writestr(n, d)
    root = tmp_path / "imported"
    with pytest.raises(AutosegError, match=r"checkpoint_final\.safetensors' has SHA-256 .* manifest"):
        import_bundle(tampered, root)
    _assert_nothing_installed(root)


def test_corrupted_bytes_in_zip_are_refused(bundle, tmp_path):
    raw = bytearray(bundle.read_bytes())
    data = _members(bundle)[f"{DATASET}/3d_fullres/fold_0/checkpoint_final.safetensors"]
    at = raw.find(data)  # stored uncompressed, so the bytes are findable
    assert at > 0
    raw[at + len(data) - 1] ^= 0xFF
    broken = tmp_path / "broken.zip"
    broken.write_bytes(bytes(raw))
    root = tmp_path / "imported"
    with pytest.raises(AutosegError, match="checkpoint_final.safetensors"):
        import_bundle(broken, root)
    _assert_nothing_installed(root)


@pytest.mark.parametrize("evil, message", [
    ("../evil.json", "unsafe path"),
    (f"{DATASET}/../evil.json", "unsafe path"),
    ("/etc/evil.json", "absolute path"),
    (f"C:{DATASET}/evil.json", "drive letter"),
    (f"{DATASET}\\evil.json", "backslash"),
    ("Other/evil.json", "one top-level dataset folder"),
    ("evil.json", "outside the dataset folder"),
    (f"{DATASET}/3d_fullres/fold_0/model.pt", "not an allowed kind"),
    (f"{DATASET}/3d_fullres/fold_0/model.pkl", "not an allowed kind"),
    (f"{DATASET}/run.py", "not an allowed kind"),
])
def test_hostile_member_names(bundle, tmp_path, evil, message):
    members = {**_good_members(bundle), evil: b"{}"}
    root = tmp_path / "imported"
    with pytest.raises(AutosegError, match=message):
        import_bundle(_make_zip(tmp_path / "evil.zip", members), root)
    _assert_nothing_installed(root)


def test_symlink_member(bundle, tmp_path):
    name = f"{DATASET}/link.json"
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    members = {**_good_members(bundle), name: b"/etc/passwd"}
    root = tmp_path / "imported"
    with pytest.raises(AutosegError, match="symbolic link"):
        import_bundle(_make_zip(tmp_path / "link.zip", members, infos={name: info}), root)
    _assert_nothing_installed(root)


def test_member_not_in_manifest_and_vice_versa(bundle, tmp_path):
    members = _members(bundle)
    members[f"{DATASET}/extra.json"] = b"{}"
    extra = tmp_path / "extra.zip"
    with zipfile.ZipFile(extra, "w") as zf:
        for n, d in members.items():
            zf.writestr(n, d)
    with pytest.raises(AutosegError, match=r"not listed in the manifest: .*extra\.json"):
        import_bundle(extra, tmp_path / "a")
    listed_only = _make_zip(tmp_path / "missing.zip", _good_members(bundle), manifest_extra={"ghost.json": b"{}"})
    with pytest.raises(AutosegError, match=r"missing from the bundle: ghost\.json"):
        import_bundle(listed_only, tmp_path / "b")


def test_manifest_missing_or_invalid(bundle, tmp_path):
    no_manifest = tmp_path / "nomanifest.zip"
    with zipfile.ZipFile(no_manifest, "w") as zf:
        for n, d in _good_members(bundle).items():
            zf.writestr(n, d)
    with pytest.raises(AutosegError, match="not an autoseg model bundle"):
        import_bundle(no_manifest, tmp_path / "a")
    bad = tmp_path / "badmanifest.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        for n, d in _good_members(bundle).items():
            zf.writestr(n, d)
        zf.writestr(f"{DATASET}/manifest.json", "{not json")
    with pytest.raises(AutosegError, match="not valid JSON"):
        import_bundle(bad, tmp_path / "b")


def test_oversize(bundle, tmp_path):
    root = tmp_path / "imported"
    with pytest.raises(AutosegError, match="more than 100 bytes"):
        import_bundle(bundle, root, max_bytes=100)
    _assert_nothing_installed(root)


def test_zip_bomb_ratio(bundle, tmp_path):
    name = f"{DATASET}/padding.json"
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    members = {**_good_members(bundle), name: b" " * 10_000_000}  # deflates ~1030:1
    root = tmp_path / "imported"
    with pytest.raises(AutosegError, match="zip bomb"):
        import_bundle(_make_zip(tmp_path / "bomb.zip", members, infos={name: info}), root)
    _assert_nothing_installed(root)


def test_invalid_plans_and_safetensors_are_refused(bundle, tmp_path):
    members = _good_members(bundle)
    members[f"{DATASET}/3d_fullres/plans.json"] = b'{"not": "plans"}'
    with pytest.raises(AutosegError, match="plans does not match its schema"):
        import_bundle(_make_zip(tmp_path / "plans.zip", members), tmp_path / "a")
    _assert_nothing_installed(tmp_path / "a")
    members = _good_members(bundle)
    members[f"{DATASET}/3d_fullres/fold_0/checkpoint_final.safetensors"] = b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage"
    with pytest.raises(AutosegError, match="not a readable safetensors"):
        import_bundle(_make_zip(tmp_path / "st.zip", members), tmp_path / "b")
    _assert_nothing_installed(tmp_path / "b")


def test_not_a_zip(tmp_path):
    fake = tmp_path / "model.zip"
    fake.write_text("this is not a zip")
    with pytest.raises(AutosegError, match=r"model\.zip: not a zip file"):
        import_bundle(fake, tmp_path / "imported")
    with pytest.raises(AutosegError, match="cannot open"):
        import_bundle(tmp_path / "absent.zip", tmp_path / "imported")


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_export_import(results, tmp_path, monkeypatch, capsys):
    import argparse

    monkeypatch.setenv("AUTOSEG_RESULTS", str(results.parent))
    monkeypatch.setenv("AUTOSEG_PREPROCESSED", str(tmp_path / "pre"))
    (tmp_path / "pre" / DATASET).mkdir(parents=True)
    (tmp_path / "pre" / DATASET / "fingerprint.json").write_text("{}")
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    out = tmp_path / "m.zip"
    args = parser.parse_args(["export", "-d", "501", "-o", str(out)])
    assert args.func(args) == 0
    assert "3d_fullres fold(s) 0" in capsys.readouterr().out
    assert f"{DATASET}/fingerprint.json" in _members(out)
    monkeypatch.setenv("AUTOSEG_RESULTS", str(tmp_path / "other"))
    args = parser.parse_args(["import", str(out)])
    assert args.func(args) == 0
    assert (tmp_path / "other" / DATASET / "3d_fullres" / "plans.json").is_file()
    args = parser.parse_args(["import", str(out)])
    with pytest.raises(AutosegError, match="--overwrite"):
        args.func(args)
    args = parser.parse_args(["import", str(out), "--overwrite"])
    assert args.func(args) == 0
    for action in parser._subparsers._group_actions[0].choices["export"]._actions:
        assert action.help


def test_export_rejects_path_like_selection(results, tmp_path):
    with pytest.raises(AutosegError, match="not a configuration or fold name"):
        export_bundle(results, tmp_path / "m.zip", ["../x"], None, None)
    out = export_bundle(results, tmp_path / "m.zip", ["3d_fullres", "3d_fullres"], ["0", "fold_0"], None)
    assert len(read_manifest(out)["files"]) == 4
