"""Model bundles: one zip holding everything ``autoseg predict`` needs from a trained dataset, and nothing else.

Layout inside the zip (one top-level folder named after the dataset)::

    Dataset501_Name/manifest.json                      autoseg_version, dataset, created_utc, files
    Dataset501_Name/inference_plan.json                if the results folder has one
    Dataset501_Name/fingerprint.json                   if exported with one
    Dataset501_Name/<config>/plans.json
    Dataset501_Name/<config>/dataset.json
    Dataset501_Name/<config>/fold_<k>/checkpoint_final.safetensors
    Dataset501_Name/<config>/fold_<k>/checkpoint_final.onnx      with export --onnx

``manifest.json`` lists every other member with its SHA-256 and size. Weights are safetensors only, so importing a
bundle never unpickles anything. A bundle is untrusted input: ``import_bundle`` checks every member's name, type,
size and compression ratio against the manifest before it writes a single byte, verifies each hash while it
extracts into a temporary folder next to the target, validates plans and safetensors headers, and only then
renames the folder into place.

With ``onnx`` each fold's network is also exported to ONNX (:func:`autoseg.inference.engines.export_onnx`: dynamic
batch and spatial axes) for runtimes outside autoseg, and checked against torch on a random tile batch; the manifest
records the opset, the runtime that checked it and the max |logit difference| per file. ``autoseg predict`` itself
always exports from the safetensors, so the two can never disagree.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import json
import os
import re
import shutil
import stat
import tempfile
import uuid
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .version import __version__
from .atomic import atomic_path
from .errors import AutosegError
from .io.dataset import dataset_json_problems
from .jsonfile import parse_json, read_json
from .layout import DATASET_JSON, FINGERPRINT_JSON, INFERENCE_PLAN_JSON, PLANS_JSON, checkpoint_name, onnx_name

MANIFEST = "manifest.json"
FINAL = checkpoint_name("final")
FINAL_ONNX = onnx_name("final")
ALLOWED_SUFFIXES = (".json", ".safetensors", ".onnx")
DEFAULT_MAX_BYTES = 4 * 2**30
MAX_RATIO = 1000  # uncompressed / compressed; deflate cannot legitimately exceed ~1030 and real files sit far below
MAX_JSON_BYTES = 64 * 2**20  # JSON members are parsed in memory, so they get a tighter bound
CHUNK = 2**20

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DRIVE = re.compile(r"^[A-Za-z]:")


# ---------------------------------------------------------------------------------------------------- export


def fold_sort_key(name: str) -> tuple[int, int, str]:
    tail = name.removeprefix("fold_")
    return (0, int(tail), "") if tail.isdigit() else (1, 0, tail)


def _finished_folds(config_dir: Path) -> list[str]:
    """Fold ids (``"0"``, ``"all"``) under ``config_dir`` that have a final checkpoint."""
    folds = [p.name.removeprefix("fold_") for p in config_dir.glob("fold_*") if (p / FINAL).is_file()]
    return sorted(folds, key=fold_sort_key)


def _add_file(zf: zipfile.ZipFile, src: Path, arcname: str, date_time: tuple[int, ...]) -> dict[str, Any]:
    """Stream ``src`` into the zip while hashing it (one read, so hash and content always agree)."""
    info = zipfile.ZipInfo(arcname, date_time=date_time)
    info.create_system = 3  # unix, so external_attr below is read as a mode
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    info.compress_type = zipfile.ZIP_STORED if arcname.endswith(".safetensors") else zipfile.ZIP_DEFLATED
    digest, size = hashlib.sha256(), 0
    with open(src, "rb") as f:
        info.file_size = os.fstat(f.fileno()).st_size  # lets zipfile switch to zip64 for files over 2 GiB
        with zf.open(info, "w") as out:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
    return {"sha256": digest.hexdigest(), "bytes": size}


def _previous_stage(config_dir: Path) -> str | None:
    """The ``previous_stage`` of a cascade configuration's plans, else None (also when unreadable: checked later)."""
    try:
        plans = json.loads((config_dir / PLANS_JSON).read_text())
        return plans["configurations"][config_dir.name].get("previous_stage")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _select(results_dataset_dir: Path, configurations: list[str] | None,
            folds: list[str] | None) -> dict[str, list[str]]:
    """``{configuration: [fold ids]}`` to export, with errors that say how to fix a bad selection."""
    available = {p.name: _finished_folds(p) for p in sorted(results_dataset_dir.iterdir()) if p.is_dir()}
    finished = {c: f for c, f in available.items() if f}
    if configurations is None:
        if not finished:
            raise AutosegError(f"{results_dataset_dir}: no configuration has a fold with {FINAL}; "
                               "train one to the end first (autoseg train)")
        configurations = list(finished)
    wanted_folds = None if folds is None else list(dict.fromkeys(str(f).removeprefix("fold_") for f in folds))
    for name in [*configurations, *(wanted_folds or [])]:
        if not _SAFE_NAME.match(name):
            raise AutosegError(f"'{name}' is not a configuration or fold name (e.g. -c 3d_fullres -f 0 1)")
    configurations = list(dict.fromkeys(configurations))
    for config in list(configurations):  # a cascade predicts with its first stage too
        previous = _previous_stage(results_dataset_dir / config)
        if previous and previous not in configurations:
            configurations.append(previous)
    selection: dict[str, list[str]] = {}
    for config in configurations:
        config_dir = results_dataset_dir / config
        if not config_dir.is_dir():
            have = ", ".join(finished) or "none with a finished fold"
            raise AutosegError(f"{config_dir}: no such configuration in the results (available: {have})")
        for required in (PLANS_JSON, DATASET_JSON):
            if not (config_dir / required).is_file():
                raise AutosegError(f"{config_dir / required} is missing; it is written when training starts, "
                                   "so this folder is incomplete")
        if wanted_folds is None:
            chosen = available[config]
            if not chosen:
                raise AutosegError(f"{config_dir}: no fold has {FINAL}; train one to the end first")
        else:
            chosen = wanted_folds
            for fold in chosen:
                if not (config_dir / f"fold_{fold}" / FINAL).is_file():
                    raise AutosegError(f"{config_dir / f'fold_{fold}'}: fold {fold} has no {FINAL}; "
                                       "train it to the end or leave it out with -f")
        selection[config] = chosen
    return selection


def _export_onnx_files(results_dataset_dir: Path, selection: dict[str, list[str]],
                       folder: Path) -> tuple[list[tuple[Path, str]], dict[str, Any]]:
    """Each selected fold's final network as ONNX in ``folder``, checked against torch with ONNX Runtime (else
    OpenVINO): the (file, bundle path) pairs and the manifest's ``onnx`` entry."""
    import torch

    from .checkpoint import load_weights
    from .inference.engines import ENGINES, OPSET, checked_runtime_network, export_onnx, require
    from .io.dataset import load_dataset_json
    from .labels import LabelSpec
    from .network import build_network

    engine = next((e for e in ENGINES[1:] if importlib.util.find_spec(e) is not None), "onnxruntime")
    runtime = require(engine, "checking the ONNX export against torch")
    sources, diffs = [], {}
    for config, chosen in selection.items():
        config_dir = results_dataset_dir / config
        plans = read_json(config_dir / PLANS_JSON, "train the configuration again (it writes plans.json)", "plans")
        meta = load_dataset_json(config_dir)
        settings = plans["configurations"][config]
        in_channels, n_out = len(meta["channel_names"]), LabelSpec.from_meta(meta).layout()[0]
        for fold in chosen:
            net = build_network(settings, in_channels, n_out)
            load_weights(config_dir / f"fold_{fold}" / FINAL, net)
            net.eval()
            target = folder / f"{config}_fold_{fold}.onnx"
            target.write_bytes(export_onnx(net, in_channels, settings["patch_size"]))
            rel = f"{config}/fold_{fold}/{FINAL_ONNX}"
            _, diffs[rel] = checked_runtime_network(engine, net, in_channels, settings["patch_size"],
                                                    torch.device("cpu"), where=rel, model=target.read_bytes())
            sources.append((target, rel))
    entry = {"opset": OPSET, "input": "image (batch, channels, [z,] y, x) float32, preprocessed as in plans.json",
             "output": "logits (batch, outputs, [z,] y, x)", "checked_with": f"{engine} {runtime.__version__}",
             "max_abs_logit_diff": diffs}
    return sources, entry


def write_bundle(results_dataset_dir: Path, out_zip: Path, configurations: list[str] | None, folds: list[str] | None,
            fingerprint: Path | None, onnx: bool = False) -> dict[str, Any]:
    """:func:`export_bundle`, returning the manifest with the exported ``selection`` (configuration -> folds);
    ``onnx`` adds each fold's network as ONNX (see the module docstring)."""
    results_dataset_dir, out_zip = Path(results_dataset_dir), Path(out_zip)
    if not results_dataset_dir.is_dir():
        raise AutosegError(f"{results_dataset_dir}: no such results folder; train a model first (autoseg train) "
                           "or check AUTOSEG_RESULTS")
    dataset = results_dataset_dir.name
    if not _SAFE_NAME.match(dataset):
        raise AutosegError(f"{results_dataset_dir}: '{dataset}' is not a usable dataset folder name")
    selection = _select(results_dataset_dir, configurations, folds)

    sources: list[tuple[Path, str]] = []  # (file, path relative to the dataset folder)
    if (results_dataset_dir / INFERENCE_PLAN_JSON).is_file():
        sources.append((results_dataset_dir / INFERENCE_PLAN_JSON, INFERENCE_PLAN_JSON))
    if fingerprint is not None:
        fingerprint = Path(fingerprint)
        read_json(fingerprint, "rerun `autoseg plan_and_preprocess` or export with --no-fingerprint")
        sources.append((fingerprint, FINGERPRINT_JSON))
    for config, chosen in selection.items():
        for name in (PLANS_JSON, DATASET_JSON):
            sources.append((results_dataset_dir / config / name, f"{config}/{name}"))
        for fold in chosen:
            sources.append((results_dataset_dir / config / f"fold_{fold}" / FINAL, f"{config}/fold_{fold}/{FINAL}"))
    scratch = Path(tempfile.mkdtemp(prefix="autoseg-onnx-")) if onnx else None
    try:
        onnx_entry = None
        if scratch is not None:
            onnx_sources, onnx_entry = _export_onnx_files(results_dataset_dir, selection, scratch)
            sources += onnx_sources
        return _write_zip(out_zip, dataset, sources, selection, onnx_entry)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _write_zip(out_zip: Path, dataset: str, sources: list[tuple[Path, str]], selection: dict[str, list[str]],
               onnx_entry: dict[str, Any] | None) -> dict[str, Any]:
    """The bundle from (file, path in the dataset folder) pairs, atomically; returns the manifest."""
    now = datetime.now(timezone.utc)
    date_time = now.timetuple()[:6]
    manifest: dict[str, Any] = {
        "autoseg_version": __version__,
        "dataset": dataset,
        "created_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "files": {},
    }
    if onnx_entry is not None:
        manifest["onnx"] = onnx_entry
    with atomic_path(out_zip) as tmp:
        with zipfile.ZipFile(tmp, "w") as zf:
            for src, rel in sources:
                manifest["files"][rel] = _add_file(zf, src, f"{dataset}/{rel}", date_time)
            info = zipfile.ZipInfo(f"{dataset}/{MANIFEST}", date_time=date_time)
            info.create_system = 3
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, json.dumps(manifest, indent=1) + "\n")
    manifest["selection"] = selection
    return manifest


def export_bundle(results_dataset_dir: Path, out_zip: Path, configurations: list[str] | None = None,
                  folds: list[str] | None = None, fingerprint: Path | None = None, onnx: bool = False) -> Path:
    """Write a model bundle of ``results_dataset_dir`` (``AUTOSEG_RESULTS/<dataset>``) to ``out_zip``, atomically.

    ``configurations``: default every configuration with at least one finished fold. ``folds`` (``"0"`` or
    ``"fold_0"``, ``"all"``): default every fold with ``checkpoint_final.safetensors``; a fold asked for without
    one is an error. ``fingerprint``: optional ``fingerprint.json`` to ship along. ``onnx``: also each fold's
    network as ONNX, checked against torch. Returns ``out_zip``.
    """
    write_bundle(results_dataset_dir, out_zip, configurations, folds, fingerprint, onnx)
    return Path(out_zip)


# ---------------------------------------------------------------------------------------------------- import


def _check_name(where: str, name: str) -> list[str]:
    """The path components of a member name, or an error if extracting it could land anywhere unexpected."""
    if "\\" in name:
        raise AutosegError(f"{where}: member '{name}' contains a backslash; refusing an unsafe path")
    if name.startswith("/"):
        raise AutosegError(f"{where}: member '{name}' is an absolute path; refusing an unsafe path")
    if _DRIVE.match(name):
        raise AutosegError(f"{where}: member '{name}' starts with a drive letter; refusing an unsafe path")
    if any(ord(ch) < 32 or ch == "\x7f" for ch in name):
        raise AutosegError(f"{where}: member {name!r} contains control characters; refusing an unsafe path")
    parts = (name[:-1] if name.endswith("/") else name).split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise AutosegError(f"{where}: member '{name}' has an empty, '.' or '..' component; refusing an unsafe path")
    return parts


def _fail(where: str, message: str) -> AutosegError:
    return AutosegError(f"{where}: {message}")


def _read_manifest(where: str, zf: zipfile.ZipFile, info: zipfile.ZipInfo,
                   dataset: str) -> tuple[dict[str, Any], bytes]:
    try:
        raw = zf.read(info)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise _fail(where, f"{info.filename} cannot be read ({e})") from None
    manifest = parse_json(raw, f"{where}: {info.filename}", "export the model again (autoseg export)")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise _fail(where, f"{info.filename} must be an object with a 'files' object")
    for key in ("autoseg_version", "dataset", "created_utc"):
        if not isinstance(manifest.get(key), str):
            raise _fail(where, f"{info.filename}: '{key}' must be a string")
    if manifest["dataset"] != dataset:
        raise _fail(where, f"{info.filename} names dataset '{manifest['dataset']}' but the bundle's folder is "
                    f"'{dataset}'")
    for rel, entry in manifest["files"].items():
        if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str)
                or not _SHA256.match(entry["sha256"]) or type(entry.get("bytes")) is not int or entry["bytes"] < 0):
            raise _fail(where, f"{info.filename}: entry '{rel}' needs a lowercase hex 'sha256' and integer 'bytes'")
    return manifest, raw


def _inspect(where: str, zf: zipfile.ZipFile,
             max_bytes: int) -> tuple[str, dict[str, Any], bytes, dict[str, zipfile.ZipInfo]]:
    """Every check that needs no extraction. Returns (dataset, manifest, its bytes, {relative path: member})."""
    infos = zf.infolist()
    if not infos:
        raise _fail(where, "the bundle is empty")
    seen: set[str] = set()
    tops: set[str] = set()
    files: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in infos:
        name = info.filename
        parts = _check_name(where, name)
        key = name.rstrip("/").casefold()
        if key in seen:
            raise _fail(where, f"member '{name}' appears more than once (names differing only in case count)")
        seen.add(key)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise _fail(where, f"member '{name}' is a symbolic link; bundles hold regular files only")
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise _fail(where, f"member '{name}' is not a regular file (mode {oct(mode)})")
        if info.flag_bits & 0x1:
            raise _fail(where, f"member '{name}' is encrypted")
        tops.add(parts[0])
        if info.is_dir():
            continue
        if len(parts) < 2:
            raise _fail(where, f"member '{name}' is outside the dataset folder; a bundle holds one top-level folder")
        if not name.endswith(ALLOWED_SUFFIXES):
            raise _fail(where, f"member '{name}' is not an allowed kind of file (only "
                        f"{', '.join(ALLOWED_SUFFIXES)}; pickled .pt/.pkl files are never imported)")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _fail(where, f"member '{name}' uses compression method {info.compress_type}; "
                        "only stored and deflated members are accepted")
        if info.file_size and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise _fail(where, f"member '{name}' expands {info.file_size} bytes from {info.compress_size} "
                        f"(ratio over {MAX_RATIO}); refusing a likely zip bomb")
        if name.endswith(".json") and info.file_size > MAX_JSON_BYTES:
            raise _fail(where, f"member '{name}' is {info.file_size} bytes; JSON members are limited to "
                        f"{MAX_JSON_BYTES} bytes")
        total += info.file_size
        if total > max_bytes:
            raise _fail(where, f"the bundle unpacks to more than {max_bytes} bytes (the limit); "
                        "raise it if this is a genuine model (autoseg import --max-gb)")
        files["/".join(parts[1:])] = info
    if len(tops) != 1:
        raise _fail(where, f"expected one top-level dataset folder, found {', '.join(sorted(tops))}")
    dataset = tops.pop()
    if not _SAFE_NAME.match(dataset):
        raise _fail(where, f"top-level folder '{dataset}' is not a usable dataset folder name")
    manifest_info = files.pop(MANIFEST, None)
    if manifest_info is None:
        raise _fail(where, f"no {dataset}/{MANIFEST}; this is not an autoseg model bundle (autoseg export)")
    manifest, raw = _read_manifest(where, zf, manifest_info, dataset)
    listed = set(manifest["files"])
    unlisted = sorted(set(files) - listed)
    if unlisted:
        raise _fail(where, f"member(s) not listed in the manifest: {', '.join(f'{dataset}/{r}' for r in unlisted)}")
    missing = sorted(listed - set(files))
    if missing:
        raise _fail(where, f"manifest lists file(s) missing from the bundle: {', '.join(missing)}")
    for rel, info in files.items():
        if info.file_size != manifest["files"][rel]["bytes"]:
            raise _fail(where, f"member '{info.filename}' is {info.file_size} bytes but the manifest says "
                        f"{manifest['files'][rel]['bytes']}")
    if not any(rel.endswith("/" + FINAL) for rel in files):
        raise _fail(where, f"the bundle holds no {FINAL}; there is no trained model in it")
    return dataset, manifest, raw, files


def _extract(where: str, zf: zipfile.ZipFile, files: dict[str, zipfile.ZipInfo], manifest: dict[str, Any],
             folder: Path) -> None:
    """Write each member under ``folder``, hashing as it streams; a mismatch names the member."""
    for rel, info in files.items():
        target = folder.joinpath(*rel.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        try:
            with zf.open(info) as src, open(target, "xb") as dst:
                while chunk := src.read(CHUNK):
                    size += len(chunk)
                    if size > info.file_size:
                        raise _fail(where, f"member '{info.filename}' is longer than its declared size")
                    digest.update(chunk)
                    dst.write(chunk)
        except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as e:  # CRC error, truncation
            raise _fail(where, f"member '{info.filename}' is damaged ({e})") from None
        expected = manifest["files"][rel]
        if size != expected["bytes"]:
            raise _fail(where, f"member '{info.filename}' has {size} bytes, the manifest says {expected['bytes']}")
        if digest.hexdigest() != expected["sha256"]:
            raise _fail(where, f"member '{info.filename}' has SHA-256 {digest.hexdigest()} but the manifest says "
                        f"{expected['sha256']}; the bundle was modified or damaged")


def _validate_extracted(where: str, folder: Path, dataset: str, files: dict[str, zipfile.ZipInfo]) -> None:
    """Parse every JSON, schema-check every plans.json and open every safetensors header."""
    from safetensors import safe_open

    for rel in files:
        path = folder.joinpath(*rel.split("/"))
        member = f"{dataset}/{rel}"
        if rel.endswith(".json"):
            kind = "inference_plan" if rel == INFERENCE_PLAN_JSON else "plans" if path.name == PLANS_JSON else None
            obj = parse_json(path.read_bytes(), f"{where}: member '{member}'", "export the model again (autoseg export)",
                             kind)
            problems = dataset_json_problems(obj, f"member '{member}'") if path.name == DATASET_JSON else []
            if problems:
                raise _fail(where, "; ".join(problems))
            if rel == INFERENCE_PLAN_JSON:
                absent = [c for c in obj["configurations"] if f"{c}/{PLANS_JSON}" not in files]
                if absent:
                    raise _fail(where, f"member '{member}' names configuration(s) {absent} the bundle does not hold; "
                                "export the model again (autoseg export)")
        elif rel.endswith(".safetensors"):
            try:
                with safe_open(str(path), framework="numpy") as f:
                    f.keys()
            except Exception as e:  # safetensors raises its own error types for a bad header
                raise _fail(where, f"member '{member}' is not a readable safetensors file ({e})") from None
    configs = {rel.split("/")[0] for rel in files if "/fold_" in rel and rel.endswith(FINAL)}
    for config in sorted(configs):
        for required in (PLANS_JSON, DATASET_JSON):
            if f"{config}/{required}" not in files:
                raise _fail(where, f"configuration '{config}' has weights but no {required}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def import_bundle(zip_path: Path, results_root: Path, max_bytes: int = DEFAULT_MAX_BYTES,
                  overwrite: bool = False) -> Path:
    """Check, extract and install a bundle as ``results_root/<dataset>``; returns that folder.

    Nothing is written until every member passed the name, type, size and manifest checks; files are then
    extracted to a temporary folder next to the target, hash-verified and validated, and renamed into place.
    An existing dataset folder is an error unless ``overwrite``, which swaps the new folder in and deletes the old.
    """
    zip_path, results_root = Path(zip_path), Path(results_root)
    where = str(zip_path)
    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        raise AutosegError(f"{where}: not a zip file; expected a model bundle written by autoseg export") from None
    except OSError as e:
        raise AutosegError(f"{where}: cannot open the bundle ({e.strerror or e})") from None
    with zf:
        dataset, manifest, raw, files = _inspect(where, zf, max_bytes)
        target = results_root / dataset
        if target.exists() and not overwrite:
            raise _fail(where, f"{target} already exists; pass --overwrite to replace it")
        results_root.mkdir(parents=True, exist_ok=True)
        tmp = results_root / f".autoseg-import-{uuid.uuid4().hex[:8]}-{dataset}"
        try:
            tmp.mkdir()
            _extract(where, zf, files, manifest, tmp)
            (tmp / MANIFEST).write_bytes(raw)
            _validate_extracted(where, tmp, dataset, files)
            if target.exists() or target.is_symlink():
                if not overwrite:
                    raise _fail(where, f"{target} already exists; pass --overwrite to replace it")
                aside = results_root / f".autoseg-old-{uuid.uuid4().hex[:8]}-{dataset}"
                os.rename(target, aside)
                try:
                    os.rename(tmp, target)
                except OSError:
                    os.rename(aside, target)
                    raise
                _remove(aside)
            else:
                os.rename(tmp, target)
        finally:
            if tmp.exists():
                _remove(tmp)
    return target


def open_bundle(zip_path: Path) -> Path:
    """Import a bundle into a private temporary directory and return its dataset folder (``predict -m model.zip``).

    The directory is removed when the process exits.
    """
    root = Path(tempfile.mkdtemp(prefix="autoseg-model-"))
    atexit.register(shutil.rmtree, root, True)
    try:
        return import_bundle(zip_path, root)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def read_manifest(zip_path: Path) -> dict[str, Any]:
    """The manifest of a bundle after the same pre-extraction checks ``import_bundle`` runs (for inspection)."""
    where = str(zip_path)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            return _inspect(where, zf, DEFAULT_MAX_BYTES)[1]
    except zipfile.BadZipFile:
        raise AutosegError(f"{where}: not a zip file; expected a model bundle written by autoseg export") from None
    except OSError as e:
        raise AutosegError(f"{where}: cannot open the bundle ({e.strerror or e})") from None
