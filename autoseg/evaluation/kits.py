"""The KiTS challenges' official metrics (KiTS21/KiTS23): Dice and the area-weighted surface Dice of the three
hierarchical evaluation classes, at the challenges' tolerances.

autoseg's own surface Dice (:mod:`autoseg.evaluation.metrics`) counts boundary *voxels*; the KiTS evaluation (DeepMind's
``surface-distance``) weights each surface element by its *area* on the anisotropic grid, so only this one can sit
next to a KiTS leaderboard. It is computed by MONAI's ``compute_surface_dice(use_subvoxels=True)``, which follows
DeepMind's implementation (an optional extra: ``pip install autoseg[kits]``). Conventions as the official
``compute_metrics_for_label``: both masks empty gives Dice 1 and surface Dice 1, one empty gives 0 for both.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import AutosegError
from ..labels import check_labels

# kits21/kits23 configuration/labels.py HEC_SD_TOLERANCES_MM (from the inter-rater variability of KiTS21)
KITS_TOLERANCES_MM = {"kidney_and_masses": 1.0330772532390826, "masses": 1.1328796488598762,
                      "tumor": 1.1498198361434828}


def kits_regions(labels: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Label values of the three KiTS evaluation classes in a dataset's labels: the KiTS23 regions (``kidney``
    [1, 2, 3], ``masses`` [2, 3], ``tumor`` 2, as ``autoseg convert kits23`` writes them) or a kidney with its tumour
    (``kidney`` + ``kidney_tumor``, KiTS19 and the phantom; masses = tumour there)."""
    checked = check_labels(labels)
    as_set = {n: set(v) if isinstance(v, tuple) else {v} for n, v in checked.items()}
    if {"kidney", "masses", "tumor"} <= set(as_set):
        return {"kidney_and_masses": tuple(sorted(as_set["kidney"])), "masses": tuple(sorted(as_set["masses"])),
                "tumor": tuple(sorted(as_set["tumor"]))}
    tumour = next((n for n in ("kidney_tumor", "kidney_tumour") if n in as_set), None)
    if "kidney" in as_set and tumour:
        whole = tuple(sorted(as_set["kidney"] | as_set[tumour]))
        return {"kidney_and_masses": whole, "masses": tuple(sorted(as_set[tumour])),
                "tumor": tuple(sorted(as_set[tumour]))}
    raise AutosegError(f"labels {dict(labels)}: --surface-dice kits needs KiTS labels, either kidney/masses/tumor "
                       "regions (autoseg convert kits23) or kidney and kidney_tumor")


def area_surface_dice(pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float], tolerance_mm: float) -> float:
    """Area-weighted surface Dice of two boolean masks (DeepMind's definition, via MONAI), KiTS's empty rules.

    >>> ref = np.zeros((100, 100, 100), bool); ref[:50] = True
    >>> pred = np.zeros_like(ref); pred[:51] = True
    >>> round(area_surface_dice(pred, ref, (2, 1, 1), 1.0), 3)  # surface-distance test value  # doctest: +SKIP
    0.836
    """
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if not pred.any() and not ref.any():
        return 1.0
    if not pred.any() or not ref.any():
        return 0.0
    try:
        import torch
        from monai.metrics import compute_surface_dice
    except ImportError:
        raise AutosegError("--surface-dice kits needs MONAI's surface Dice; install it with "
                           "`pip install 'autoseg[kits]'` (or pip install monai)") from None

    def one_hot(mask: np.ndarray) -> Any:
        t = torch.from_numpy(mask.astype(np.uint8))[None, None]
        return torch.cat([1 - t, t], 1)

    with warnings.catch_warnings():  # MONAI warns about its own deprecated internal argument
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_surface_dice(one_hot(pred), one_hot(ref), [float(tolerance_mm)], include_background=False,
                                     spacing=[float(s) for s in spacing_zyx], use_subvoxels=True)
    return float(value.reshape(-1)[0])


def kits_metrics(pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float],
                 regions: Mapping[str, Sequence[int]]) -> dict[str, dict[str, float]]:
    """Per KiTS class: ``dice`` and ``surface_dice`` (at :data:`KITS_TOLERANCES_MM`) of two label maps."""
    out = {}
    for name, values in regions.items():
        p, r = np.isin(pred, list(values)), np.isin(ref, list(values))
        denom = int(p.sum()) + int(r.sum())
        dice = 1.0 if denom == 0 else 2.0 * int(np.logical_and(p, r).sum()) / denom
        out[name] = {"dice": dice, "surface_dice": area_surface_dice(p, r, spacing_zyx, KITS_TOLERANCES_MM[name]),
                     "tolerance_mm": KITS_TOLERANCES_MM[name]}
    return out


def summarize_kits(per_case: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean Dice and surface Dice per KiTS class over cases (the leaderboard's per-class averages)."""
    names = list(per_case[0]) if per_case else []
    return {n: {"dice_mean": float(np.mean([c[n]["dice"] for c in per_case])),
                "surface_dice_mean": float(np.mean([c[n]["surface_dice"] for c in per_case])),
                "tolerance_mm": KITS_TOLERANCES_MM[n]} for n in names} if per_case else {}


