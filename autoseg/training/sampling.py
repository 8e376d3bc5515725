"""Where training patches are centred: lesion-aware sampling by class, then by connected component.

Why: picking a class and then a voxel (nnU-Net's foreground oversampling) draws a lesion in proportion to its
volume, so one 40 mm tumour (about 30 mL) is drawn a thousand times as often as a 4 mm one, and the small lesions a
radiologist most needs found are the ones the network rarely sees. Here every patch is drawn in three steps:

1. with probability ``RANDOM_SHARE`` anywhere in a random training case (context and background);
2. otherwise a foreground class, tumour classes weighted ``TUMOUR_WEIGHT`` times as much as the others
   (:func:`class_shares` gives the fixed share of patches per class);
3. a connected component of that class, uniformly over every component of it in the training cases, so a small
   lesion is drawn as often as a large one; then a stored voxel of that component, which the patch centres on
   (jittered by the caller).

The components come from the ``component_<label>`` arrays that preprocessing stores beside the foreground
coordinates in ``<case>_fg.npz``. For a cascade's second stage (a configuration with ``previous_stage``), which only
ever predicts inside the organ regions of interest, the random share is drawn inside the ground truth's ROI boxes
(the same :func:`~autoseg.inference.cascade.roi_boxes` as prediction uses on stage 1's result), not anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..inference.cascade import Box

RANDOM_SHARE = 1.0 / 3.0
TUMOUR_WEIGHT = 2.0


def class_shares(present: Sequence[int], tumour: Sequence[int], random_share: float = RANDOM_SHARE) -> dict[int, float]:
    """Share of all patches centred on each present foreground class (pure); the rest, ``random_share``, is random.

    >>> {c: round(s, 3) for c, s in class_shares([1, 2, 3, 4], tumour=[2, 4]).items()}
    {1: 0.111, 2: 0.222, 3: 0.111, 4: 0.222}
    """
    if not present:
        return {}
    weights = {c: TUMOUR_WEIGHT if c in set(tumour) else 1.0 for c in sorted(present)}
    total = sum(weights.values())
    return {c: (1.0 - random_share) * w / total for c, w in weights.items()}


@dataclass(frozen=True)
class SamplingIndex:
    """Every foreground component of the training cases: per class an (N, 2) array of (case index, component id)."""

    case_ids: tuple[str, ...]
    components: Mapping[int, np.ndarray]
    shares: Mapping[int, float]
    rois: tuple[tuple[Box, ...], ...] | None = None  # per case: where random patches go (None: anywhere)

    @classmethod
    def build(cls, case_ids: Sequence[str], fg: Sequence[Mapping[int, tuple[np.ndarray, np.ndarray]]],
              tumour: Sequence[int], rois: Sequence[Sequence[Box]] | None = None) -> "SamplingIndex":
        """``fg[i]`` maps class -> (coords (K, 3), component ids (K,)) of case ``case_ids[i]``; ``rois[i]`` are the
        boxes random patches of that case are drawn in (a case without boxes: anywhere)."""
        per_class: dict[int, list[np.ndarray]] = {}
        for i, classes in enumerate(fg):
            for c, (coords, comp) in classes.items():
                if len(coords):
                    ids = np.unique(comp)
                    per_class.setdefault(int(c), []).append(np.stack([np.full(len(ids), i), ids], axis=1))
        components = {c: np.concatenate(v).astype(np.int64) for c, v in sorted(per_class.items())}
        boxes = None if rois is None else tuple(tuple(r) for r in rois)
        return cls(tuple(case_ids), components, class_shares(list(components), tumour), boxes)

    def draw(self, rng: np.random.Generator) -> tuple[int, int | None, int | None]:
        """(case index, class or None for a random patch, component id or None)."""
        u = float(rng.random())
        acc = 1.0 - sum(self.shares.values())
        if u < acc or not self.shares:
            return int(rng.integers(len(self.case_ids))), None, None
        chosen = list(self.shares)[-1]
        for c, share in self.shares.items():
            acc += share
            if u < acc:
                chosen = c
                break
        comps = self.components[chosen]
        case, comp = comps[int(rng.integers(len(comps)))]
        return int(case), chosen, int(comp)


    def random_centre(self, case: int, rng: np.random.Generator) -> np.ndarray | None:
        """Centre of a random patch of case ``case``: a uniform voxel of its ROI boxes (each box weighted by its
        volume), or None for anywhere in the image."""
        boxes = self.rois[case] if self.rois is not None else ()
        if not boxes:
            return None
        sizes = np.array([np.prod([s.stop - s.start for s in b]) for b in boxes], dtype=np.float64)
        box = boxes[int(rng.choice(len(boxes), p=sizes / sizes.sum()))]
        return np.array([int(rng.integers(s.start, s.stop)) for s in box], dtype=np.int64)


def pick_voxel(coords: np.ndarray, comp: np.ndarray, component: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly chosen stored voxel (z, y, x) of one component."""
    rows = np.flatnonzero(comp == component)
    return coords[rows[int(rng.integers(len(rows)))]].astype(np.int64)
