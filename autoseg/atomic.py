"""Checked, crash-safe writes: every output goes to a temporary name in the same folder, is checked, made durable,
then renamed into place.

A rename within one file system is atomic, so a reader sees either the old file, nothing, or the complete new
file; never a half-written one that looks finished. Before the rename the temporary is checked: it must be
non-empty and, where the writer gives a way to read it back, readable (a writer may swallow ENOSPC: SimpleITK's gzip
writer leaves a 0-byte ``.nii.gz`` on a full disk and reports success). It is then fsynced, and the folder after the
rename, so a power cut cannot leave a renamed but empty file either.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .errors import AutosegError

TMP_MARK = ".tmp-"

Check = Callable[[Path], None]


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError:
        if not directory:  # some file systems cannot fsync a folder; the file itself must be durable
            raise
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path, check: Check | None) -> None:
    """Refuse an empty or unreadable temporary (a full disk), fsync it, rename it to ``path``, fsync the folder."""
    fix = ("the disk is probably full or the folder was removed; free some space and rerun (nothing was kept, so "
           "the rerun redoes this output)")
    if not tmp.is_file() or tmp.stat().st_size == 0:
        raise AutosegError(f"{path}: the write produced {'an empty file' if tmp.is_file() else 'no file'}; {fix}")
    if check is not None:
        try:
            check(tmp)
        except Exception as e:  # any failure to read back means the file is not what was written
            raise AutosegError(f"{path}: the written file does not read back ({type(e).__name__}: {e}); {fix}") from None
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent, directory=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, check: Check | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block ends, check it (non-empty, then ``check(tmp)``,
    which raises when the file does not read back), fsync it and rename it to ``path``; on any error delete it.

    The temporary name keeps the final suffix(es) so writers that pick a format from the name (SimpleITK) work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_MARK}{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        yield tmp
        _commit(tmp, path, check)
    finally:
        if tmp.exists():
            tmp.unlink()


def check_zip(path: Path) -> None:
    """A zip (``.npz``, ``torch.save``, a bundle) is readable when its central directory, written last, is there."""
    with zipfile.ZipFile(path) as zf:
        zf.namelist()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write strict JSON atomically (insertion order, indent 1); NaN/Inf are refused, since no reader accepts them."""
    text = json.dumps(obj, indent=1, allow_nan=False) + "\n"
    with atomic_path(path, lambda p: json.loads(p.read_bytes())) as tmp:
        tmp.write_text(text)


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write one array as ``.npy`` atomically (memory-mappable, no pickle)."""
    array = np.ascontiguousarray(array)

    def check(p: Path) -> None:
        back = np.load(p, mmap_mode="r", allow_pickle=False)
        if back.shape != array.shape or back.dtype != array.dtype:
            raise ValueError(f"holds {back.dtype} {back.shape}, wrote {array.dtype} {array.shape}")

    with atomic_path(path, check) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Write several arrays as an uncompressed ``.npz`` atomically (no pickle)."""
    with atomic_path(path, check_zip) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete temporaries a killed process left behind; returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.iterdir() if p.name.startswith(TMP_MARK)]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def write_csv(path: Path, frame: Any) -> None:
    """Write a pandas DataFrame as CSV atomically (NaN as an empty field)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN/Inf floats replaced by None and numpy scalars by Python ones, for strict JSON."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj
