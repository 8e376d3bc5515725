"""Converters from the public liver and kidney tumour datasets' own layouts to the raw (nnU-Net v2) layout.

Each converter finds the cases of its dataset, copies every image to ``imagesTr/CASE_0000.nii.gz`` (or ``imagesTs``
when the case has no label) and every label to ``labelsTr/CASE.nii.gz``, and writes ``dataset.json`` last. Files are
copied byte for byte (``.nii`` files are gzip-compressed, which a ``.nii.gz`` is), so the geometry is the source's
exactly. Writes are atomic; an interrupted conversion (killed, Ctrl-C) is continued by the same command, which
removes the temporaries a killed run left and keeps the files it finished, and ends with the same bytes as an
uninterrupted run (the gzip header records no time or temporary name); a finished one is refused.

========== ============================================ ===========================================================
dataset    source layout                                labels
========== ============================================ ===========================================================
kits19     ``data/case_00000/imaging.nii.gz``,          kidney 1, kidney_tumor 2 (cases without a segmentation:
           ``segmentation.nii.gz``                      the 90 test cases, go to imagesTs)
kits23     ``dataset/case_00000/imaging.nii.gz``,       regions as nnU-Net's Dataset220_KiTS2023 converter: kidney
           ``segmentation.nii.gz``                      (kidney+masses) [1, 2, 3], masses [2, 3], tumor 2;
                                                        regions_class_order [1, 3, 2] (cyst 3 as a mass)
lits       ``volume-N.nii`` and ``segmentation-N.nii``  liver 1, liver_tumor 2; ``test-volume-N.nii`` to imagesTs
           in any subfolder (Training Batch 1/2)
msd-liver  Task03_Liver: ``imagesTr/liver_N.nii.gz``,   liver 1, liver_tumor 2 (MSD calls it "cancer"); MSD's
           ``labelsTr/``, ``imagesTs/``, dataset.json   dataset.json must declare exactly these three values
========== ============================================ ===========================================================
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..atomic import atomic_path, remove_stale_temporaries, write_json
from ..errors import AutosegError
from ..layout import DATASET_JSON, IMAGES_TR, IMAGES_TS, LABELS_TR, image_file


@dataclass(frozen=True)
class SourceCase:
    """One case of a public dataset: its id in the raw layout, its image file and its label file (None: test)."""

    case_id: str
    image: Path
    label: Path | None


@dataclass(frozen=True)
class Converter:
    """How one public dataset maps to the raw layout."""

    name: str
    labels: dict[str, Any]
    find: Callable[[Path], list[SourceCase]]
    reference: str
    extra: tuple[tuple[str, Any], ...] = ()


def _nifti(folder: Path, stem: str) -> Path | None:
    for ending in (".nii.gz", ".nii"):
        if (folder / f"{stem}{ending}").is_file():
            return folder / f"{stem}{ending}"
    return None


def _case_folders(src: Path, inner: str) -> list[SourceCase]:
    """KiTS: ``<src>[/<inner>]/case_XXXXX/imaging.nii.gz`` and ``segmentation.nii.gz``."""
    root = src / inner if (src / inner).is_dir() else src
    cases = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"case_\d{5}", p.name)):
        image = _nifti(folder, "imaging")
        if image is None:
            raise AutosegError(f"{folder}: has no imaging.nii.gz; is the download complete?")
        cases.append(SourceCase(folder.name, image, _nifti(folder, "segmentation")))
    return cases


def find_kits19(src: Path) -> list[SourceCase]:
    """KiTS19: the repository's ``data/`` folder (or ``src`` itself) of ``case_XXXXX`` folders."""
    return _case_folders(src, "data")


def find_kits23(src: Path) -> list[SourceCase]:
    """KiTS23: the repository's ``dataset/`` folder (or ``src`` itself) of ``case_XXXXX`` folders."""
    return _case_folders(src, "dataset")


def find_lits(src: Path) -> list[SourceCase]:
    """LiTS: ``volume-N``/``segmentation-N`` (training) and ``test-volume-N`` anywhere under ``src``."""
    found: dict[str, dict[str, Path]] = {}
    pattern = re.compile(r"^(test-volume|volume|segmentation)-(\d+)\.nii(\.gz)?$")
    for p in sorted(src.rglob("*")):
        m = pattern.match(p.name)
        if m and p.is_file():
            kind, n = m.group(1), int(m.group(2))
            case = f"lits_test_{n:03d}" if kind == "test-volume" else f"lits_{n:03d}"
            slot = "label" if kind == "segmentation" else "image"
            if slot in found.setdefault(case, {}):
                raise AutosegError(f"{p}: {kind}-{n} is also {found[case][slot]}; keep one copy")
            found[case][slot] = p
    orphans = [str(f["label"]) for f in found.values() if "image" not in f]
    if orphans:
        raise AutosegError(f"segmentation(s) without their volume-N file: {orphans[:5]}; is the download complete?")
    return [SourceCase(c, f["image"], f.get("label")) for c, f in sorted(found.items())]


def find_msd_liver(src: Path) -> list[SourceCase]:
    """MSD Task03_Liver: ``imagesTr``/``labelsTr``/``imagesTs`` of ``liver_N.nii.gz`` and MSD's dataset.json
    (macOS ``._`` files from the tar are skipped)."""
    try:
        meta = json.loads((src / DATASET_JSON).read_text())
        labels = {int(k): str(v).lower() for k, v in meta["labels"].items()}
    except (OSError, json.JSONDecodeError, KeyError, ValueError, AttributeError) as e:
        raise AutosegError(f"{src / DATASET_JSON}: not MSD's dataset.json ({e}); pass the Task03_Liver folder") \
            from None
    if sorted(labels) != [0, 1, 2] or labels[1] != "liver":
        raise AutosegError(f"{src / DATASET_JSON}: labels {meta['labels']} are not Task03_Liver's "
                           "(0 background, 1 liver, 2 cancer)")
    cases = []
    for split in ("Tr", "Ts"):
        folder = src / f"images{split}"
        for p in sorted(folder.glob("*.nii.gz")) if folder.is_dir() else []:
            if p.name.startswith("._"):
                continue
            case = p.name[: -len(".nii.gz")]
            label = src / "labelsTr" / p.name if split == "Tr" else None
            if label is not None and not label.is_file():
                raise AutosegError(f"{p}: has no label {label}; is the download complete?")
            cases.append(SourceCase(case, p, label))
    return cases


CONVERTERS: dict[str, Converter] = {
    "kits19": Converter("KiTS19", {"background": 0, "kidney": 1, "kidney_tumor": 2}, find_kits19,
                        "https://github.com/neheller/kits19"),
    "kits23": Converter("KiTS23", {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2},
                        find_kits23, "https://github.com/neheller/kits23",
                        (("regions_class_order", [1, 3, 2]),)),
    "lits": Converter("LiTS", {"background": 0, "liver": 1, "liver_tumor": 2}, find_lits,
                      "https://competitions.codalab.org/competitions/17094"),
    "msd-liver": Converter("MSDLiver", {"background": 0, "liver": 1, "liver_tumor": 2}, find_msd_liver,
                           "http://medicaldecathlon.com/"),
}


def _copy_nifti(src: Path, dst: Path) -> None:
    """Copy a NIfTI file to ``dst`` (``.nii.gz``) atomically; an uncompressed ``.nii`` is gzip-compressed, with
    no file name or time in the header, so the same source always gives the same bytes."""
    with atomic_path(dst) as tmp:
        if src.name.endswith(".gz"):
            shutil.copyfile(src, tmp)
        else:
            with open(src, "rb") as fin, open(tmp, "wb") as raw, \
                    gzip.GzipFile(filename="", mode="wb", compresslevel=6, fileobj=raw, mtime=0) as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)


def convert_dataset(kind: str, src: str | Path, raw_root: str | Path, dataset_id: int) -> Path:
    """Convert the public dataset ``kind`` at ``src`` into ``<raw_root>/DatasetXXX_<Name>``; returns that folder."""
    if kind not in CONVERTERS:
        raise AutosegError(f"unknown dataset {kind!r}; choose one of {', '.join(CONVERTERS)}")
    if not 1 <= dataset_id <= 999:
        raise AutosegError(f"-d {dataset_id}: dataset ids are 1-999")
    src, raw_root = Path(src), Path(raw_root)
    if not src.is_dir():
        raise AutosegError(f"{src}: folder not found; pass the downloaded {CONVERTERS[kind].name} folder")
    conv = CONVERTERS[kind]
    out = raw_root / f"Dataset{dataset_id:03d}_{conv.name}"
    others = [p.name for p in raw_root.glob(f"Dataset{dataset_id:03d}_*") if p != out] if raw_root.is_dir() else []
    if others:
        raise AutosegError(f"-d {dataset_id}: id already used by {raw_root / others[0]}; choose another id")
    if (out / DATASET_JSON).is_file():
        raise AutosegError(f"{out}: already converted (dataset.json exists); delete the folder to convert again")
    cases = conv.find(src)
    training = [c for c in cases if c.label is not None]
    if not training:
        raise AutosegError(f"{src}: no {conv.name} training cases found; expected the layout described in "
                           "`autoseg convert --help`")
    for folder in (IMAGES_TR, LABELS_TR, IMAGES_TS):  # half-written files of a killed run
        remove_stale_temporaries(out / folder)
    for case in cases:
        split = "Tr" if case.label is not None else "Ts"
        target = out / f"images{split}" / image_file(case.case_id, 0, ".nii.gz")
        if not target.is_file():  # present: written completely by an interrupted run
            _copy_nifti(case.image, target)
        if case.label is not None and not (out / LABELS_TR / f"{case.case_id}.nii.gz").is_file():
            _copy_nifti(case.label, out / LABELS_TR / f"{case.case_id}.nii.gz")
    meta = {"name": conv.name, "reference": conv.reference, "converted_by": f"autoseg convert {kind}",
            "channel_names": {"0": "CT"}, "labels": conv.labels, **dict(conv.extra),
            "numTraining": len(training), "file_ending": ".nii.gz"}
    (out / IMAGES_TR).mkdir(parents=True, exist_ok=True)
    write_json(out / DATASET_JSON, meta)
    return out
