"""Splitting the training cases into cross-validation folds: fixed-seed splits in ``splits.json``, which a user may
edit and which every configuration of a dataset shares."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import write_json
from ..errors import AutosegError
from ..jsonfile import read_json

N_FOLDS = 5
SPLIT_SEED = 12345


def make_splits(case_ids: list[str], n_folds: int = N_FOLDS, seed: int = SPLIT_SEED) -> list[dict[str, list[str]]]:
    """``n_folds`` folds over sorted case ids, shuffled with a fixed seed (same ids give the same splits)."""
    ids = sorted(case_ids)
    if len(ids) < n_folds:
        raise AutosegError(f"{len(ids)} training cases cannot make {n_folds} folds; use --fold all")
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = [set(f.tolist()) for f in np.array_split(order, n_folds)]
    return [{"train": sorted(ids[i] for i in order if i not in f), "val": sorted(ids[i] for i in f)} for f in folds]


def load_or_create_splits(path: Path, case_ids: list[str], fold: int | None = None) -> list[dict[str, list[str]]]:
    """The splits in ``path`` if present (a user may have edited them), else new ones written there; with ``fold``,
    that fold must exist."""
    if path.exists():
        fix = f"fix the file (a list of {{\"train\": [...], \"val\": [...]}} objects) or delete it to recreate it"
        splits = read_json(path, fix, "splits")
        unknown = sorted({c for s in splits for c in s["train"] + s["val"]} - set(case_ids))
        if unknown:
            raise AutosegError(f"{path}: cases {unknown[:5]} are not preprocessed; {fix}")
        overlap = [i for i, s in enumerate(splits) if set(s["train"]) & set(s["val"])]
        if overlap:
            raise AutosegError(f"{path}: fold(s) {overlap} validate on cases they also train on; {fix}")
    else:
        splits = make_splits(case_ids)
        write_json(path, splits)
    if fold is not None and not 0 <= fold < len(splits):
        raise AutosegError(f"{path} holds {len(splits)} fold(s), so there is no fold {fold}; pick -f 0..{len(splits) - 1} "
                           "or add the fold to the file")
    return splits

