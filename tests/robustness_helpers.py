"""Helpers for test_robustness.py: isolated workspaces, bad-input makers, the tiny network, kill-and-rerun.

The worker functions at the bottom must live in an importable module (not the test module) because
``autoseg.parallel.map_cases`` starts its workers with ``spawn``: they import the function by name.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

NAME = "Dataset501_AbdomenPhantom"
ENDING = ".nii.gz"

# A network small enough that a training epoch takes a fraction of a second on one CPU core.
TINY_CONFIG = {
    "patch_size": [16, 32, 32],
    "batch_size": 2,
    "network": {
        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
        "features": [4, 8, 16],
    },
}
TRAIN_ARGS = ["train", "-d", "501", "-c", "3d_fullres", "-f", "0", "--epochs", "4", "--iters-per-epoch", "3",
              "--val-iters", "1", "--num-workers", "0", "--no-validation", "--device", "cpu",
              "--precision", "fp32"]  # runs compared bit by bit must not depend on a timing measurement (auto)
PREPROCESS_ARGS = ["plan_and_preprocess", "-d", "501", "-np", "1", "-c", "3d_fullres", "--device", "cpu"]
PREDICT_ARGS = ["predict", "-d", "501", "-c", "3d_fullres", "--device", "cpu"]


@dataclass(frozen=True)
class Workspace:
    """AUTOSEG_RAW / _PREPROCESSED / _RESULTS under one folder, plus the dataset's folder in each."""

    root: Path

    @property
    def raw_root(self) -> Path:
        return self.root / "raw"

    @property
    def pp_root(self) -> Path:
        return self.root / "preprocessed"

    @property
    def res_root(self) -> Path:
        return self.root / "results"

    @property
    def ds(self) -> Path:
        return self.raw_root / NAME

    @property
    def pp(self) -> Path:
        return self.pp_root / NAME

    @property
    def res(self) -> Path:
        return self.res_root / NAME

    def env_vars(self) -> dict[str, str]:
        return {"AUTOSEG_RAW": str(self.raw_root), "AUTOSEG_PREPROCESSED": str(self.pp_root),
                "AUTOSEG_RESULTS": str(self.res_root)}

    def env(self) -> dict[str, str]:
        """The environment for a subprocess: this one plus the workspace's folders, one torch thread."""
        return {**os.environ, **self.env_vars(), "OMP_NUM_THREADS": "1"}

    def copy_from(self, other: "Workspace", parts: Sequence[str]) -> "Workspace":
        for part in parts:  # "raw", "pp", "res"
            src = {"raw": other.raw_root, "pp": other.pp_root, "res": other.res_root}[part]
            dst = {"raw": self.raw_root, "pp": self.pp_root, "res": self.res_root}[part]
            shutil.copytree(src, dst)
        return self


def shrink_plans(plans_path: Path) -> None:
    """Overwrite the 3d_fullres entry of plans.json with the tiny network (keeps spacing and normalisation)."""
    plans = json.loads(plans_path.read_text())
    config = plans["configurations"]["3d_fullres"]
    config["patch_size"] = list(TINY_CONFIG["patch_size"])
    config["batch_size"] = TINY_CONFIG["batch_size"]
    config["network"].update(json.loads(json.dumps(TINY_CONFIG["network"])))
    plans_path.write_text(json.dumps(plans, indent=1))


# ---------------------------------------------------------------------------------------------- bad inputs


def image(ds: Path, case: str = "phantom_001", channel: int = 0) -> Path:
    return ds / "imagesTr" / f"{case}_{channel:04d}{ENDING}"


def label(ds: Path, case: str = "phantom_001") -> Path:
    return ds / "labelsTr" / f"{case}{ENDING}"


def rewrite_array(path: Path, fn: Callable[[np.ndarray], np.ndarray]) -> None:
    """Replace the voxels of a 3D file by ``fn(array)`` (shape may change), keeping spacing, origin, direction."""
    img = sitk.ReadImage(str(path))
    new = sitk.GetImageFromArray(fn(sitk.GetArrayFromImage(img)))
    new.SetSpacing(img.GetSpacing())
    new.SetOrigin(img.GetOrigin())
    new.SetDirection(img.GetDirection())
    sitk.WriteImage(new, str(path))


def rewrite_geometry(path: Path, spacing=None, origin=None, direction=None) -> None:
    img = sitk.ReadImage(str(path))
    if spacing is not None:
        img.SetSpacing(spacing(img.GetSpacing()))
    if origin is not None:
        img.SetOrigin(origin(img.GetOrigin()))
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path))


def with_nonfinite(value: float) -> Callable[[np.ndarray], np.ndarray]:
    def fn(arr: np.ndarray) -> np.ndarray:
        arr = arr.astype(np.float32)
        arr[arr.shape[0] // 2, 10:12, 10:12] = value
        return arr

    return fn


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def edit_json(path: Path, fn: Callable[[dict], None]) -> None:
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj, indent=1))


def small_inputs(src_images: Sequence[Path], out: Path, n: int) -> list[str]:
    """``n`` small test images (crops of ``src_images`` at shifting offsets, exact geometry kept by SimpleITK's
    slicing) so a prediction takes one sliding-window tile; returns the case ids."""
    out.mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(n):
        img = sitk.ReadImage(str(src_images[i % len(src_images)]))
        o = 3 * (i // len(src_images))
        crop = img[8 + o : 40 + o, 8 + o : 40 + o, 4 : 14]  # x, y, z
        case = f"small_{i:03d}"
        sitk.WriteImage(crop, str(out / f"{case}_0000{ENDING}"))
        ids.append(case)
    return ids


# ---------------------------------------------------------------------------------------- kill part-way


def run_and_kill(args: Sequence[str], env: dict[str, str], ready: Callable[[], bool], log: Path,
                 timeout: float = 90.0) -> int:
    """Start ``python -m autoseg ARGS``, wait until ``ready()`` says it made progress, SIGKILL it; returns its exit
    status (``-9`` when killed). Fails (never hangs) if it ends by itself first or takes longer than ``timeout``."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "autoseg", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while not ready():
                if proc.poll() is not None:
                    raise AssertionError(f"autoseg {args[0]} ended (exit {proc.returncode}) before it could be "
                                         f"killed part-way:\n{log.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"autoseg {args[0]} made no progress in {timeout} s:\n"
                                         f"{log.read_text()[-3000:]}")
                time.sleep(0.005)
            proc.kill()  # SIGKILL: no cleanup handler runs, like the OOM killer or a power cut
            return proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def finished(folder: Path, pattern: str) -> list[Path]:
    """Files matching ``pattern`` that are not temporaries of an atomic write."""
    return sorted(p for p in folder.glob(pattern) if not p.name.startswith(".tmp-")) if folder.is_dir() else []


def temporaries(root: Path) -> list[Path]:
    return sorted(root.rglob(".tmp-*")) if root.is_dir() else []


# ----------------------------------------------------------------------- worker functions for map_cases


def memory_error_on_b(case) -> str:
    """Raises MemoryError for the case with id ``b`` (as an allocation that does not fit would)."""
    if case.case_id == "b":
        raise MemoryError()
    return case.case_id


def die_on_c(item: str) -> str:
    """Ends its worker process at once for item ``c`` (as the kernel's OOM killer would: no exception, no cleanup)."""
    if item == "c":
        os._exit(137)
    time.sleep(0.3)  # let the other items be in flight when it dies
    return item
