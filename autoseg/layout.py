"""Where datasets, preprocessed data and results live, and how a dataset is named on the command line."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .errors import AutosegError

_DATASET_RE = re.compile(r"^Dataset(\d{3})_[A-Za-z0-9_\-]+$")


@dataclass(frozen=True)
class Roots:
    """The three top-level folders; defaults sit under the working directory."""

    raw: Path
    preprocessed: Path
    results: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> "Roots":
        env = os.environ if env is None else env
        cwd = Path.cwd() if cwd is None else cwd
        return cls(
            raw=Path(env.get("AUTOSEG_RAW", cwd / "autoseg_raw")),
            preprocessed=Path(env.get("AUTOSEG_PREPROCESSED", cwd / "autoseg_preprocessed")),
            results=Path(env.get("AUTOSEG_RESULTS", cwd / "autoseg_results")),
        )


def dataset_name(spec: str, raw_root: Path) -> str:
    """Resolve ``501`` or ``Dataset501_Name`` to the folder name under ``raw_root``."""
    spec = str(spec).strip()
    if _DATASET_RE.match(spec):
        return spec
    if spec.isdigit():
        prefix = f"Dataset{int(spec):03d}_"
        matches = sorted(p.name for p in raw_root.glob(prefix + "*") if p.is_dir()) if raw_root.is_dir() else []
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise AutosegError(
                f"no dataset with id {spec} under {raw_root} (looked for {prefix}*); "
                "set AUTOSEG_RAW or pass the full folder name, e.g. -d Dataset501_Abdomen"
            )
        raise AutosegError(f"dataset id {spec} is ambiguous under {raw_root}: {', '.join(matches)}; pass the full name")
    raise AutosegError(f"'{spec}' is not a dataset id (e.g. 501) or name (e.g. Dataset501_Abdomen)")
