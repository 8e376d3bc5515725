"""Splitting the training cases into cross-validation folds, exactly as nnU-Net v2 does, so that cross-validation
figures are comparable with nnU-Net's on the same data; the folds live in ``splits.json``, which a user may edit (or
replace with nnU-Net's ``splits_final.json``: same format) and which every configuration of a dataset shares.

nnU-Net v2 (``generate_crossval_split``) runs scikit-learn's ``KFold(5, shuffle=True, random_state=12345)`` over the
sorted case ids. That algorithm is reproduced here without scikit-learn: the indices ``0..n-1`` are shuffled in place
by numpy's legacy ``RandomState(12345)`` (what ``check_random_state(12345).shuffle`` does), the first ``n % 5`` folds
get ``n // 5 + 1`` of them and the rest ``n // 5``, and each fold's train and validation ids are listed in sorted
order (KFold yields both index sets ascending).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import write_json
from ..errors import AutosegError
from ..jsonfile import read_json

N_FOLDS = 5
SPLIT_SEED = 12345


def kfold_val_indices(n: int, n_folds: int = N_FOLDS, seed: int = SPLIT_SEED) -> list[np.ndarray]:
    """Validation indices of each fold, as scikit-learn's ``KFold(n_folds, shuffle=True, random_state=seed)``
    gives them for ``n`` samples (ascending within a fold)."""
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(n_folds, n // n_folds, dtype=int)
    sizes[: n % n_folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.sort(order[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def make_splits(case_ids: list[str], n_folds: int = N_FOLDS, seed: int = SPLIT_SEED) -> list[dict[str, list[str]]]:
    """``n_folds`` folds over sorted case ids, identical to nnU-Net v2's ``splits_final.json`` for the same ids
    (same ids in any order give the same splits)."""
    ids = sorted(case_ids)
    if len(ids) < n_folds:
        raise AutosegError(f"{len(ids)} training cases cannot make {n_folds} folds; use --fold all")
    folds = []
    for val in kfold_val_indices(len(ids), n_folds, seed):
        in_val = set(val.tolist())
        folds.append({"train": [c for i, c in enumerate(ids) if i not in in_val], "val": [ids[i] for i in val]})
    return folds


def load_or_create_splits(path: Path, case_ids: list[str], fold: int | None = None) -> list[dict[str, list[str]]]:
    """The splits in ``path`` if present (a user may have edited them, or an older autoseg may have written other
    folds: they are kept), else new nnU-Net-identical ones written there; with ``fold``, that fold must exist."""
    if path.exists():
        fix = 'fix the file (a list of {"train": [...], "val": [...]} objects) or delete it to recreate it'
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
