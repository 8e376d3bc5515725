"""How far to trust a prediction: voxel uncertainty, lesion confidence, a case's expected Dice and the review flag.

Why: a mask alone does not say which cases a reader must check. autoseg already averages several *members* (every
fold and every mirroring of every sliding-window tile); how much they disagree is a free signal.

Definitions (all maps in [0, 1]; ``C`` channels; ``H(p) = -sum_c p_c log p_c``)

* **Predictive entropy** of the averaged probabilities, normalised by its maximum: ``H(p) / log C`` for softmax
  outputs; for sigmoid regions the binary entropy ``H_b(p) / log 2`` averaged over the region channels. High where
  the ensemble's answer is close to a tie, whatever the reason.
* **Mutual information** between the prediction and the member (BALD): ``H(mean_m p_m) - mean_m H(p_m)`` over the
  members' probabilities, same normalisation. Zero where every member gives the same probabilities, high where
  confident members contradict each other. The members' probabilities are averaged with the sliding window's
  Gaussian tile weights, so the difference is never negative (entropy is concave); it is clipped at 0 only against
  rounding.
* **Expected Dice** of a structure ``v`` whose mask is ``M`` and whose probability is ``q`` (the probability that a
  voxel's true label is ``v``): ``2 sum_M q / (|M| + sum q)``, the Dice between the mask and the probabilities
  taken as a soft reference. A structure predicted nowhere has expected Dice ``1 - max q``: its Dice is 1 if it is
  truly absent and 0 otherwise, and the chance that it is present is at least that of its most likely voxel.
  (The independent-voxel ``exp(-sum q)`` was measured first and dropped: a briefly trained network spreads a little
  probability over the whole volume, and the sum over ~10^5 voxels drove every estimate to 0.)
* **Lesion confidence**: mean probability of the lesion's label over its voxels times one minus their mean
  predictive entropy, in [0, 1]: high only when the network both votes for the lesion and is sure of it.
* **Review flag**: a case is flagged when any structure's expected Dice is below that structure's threshold. The
  thresholds are fitted on cross-validation (:func:`calibrate_review`, by ``find_best_configuration``): for each
  structure the lowest threshold that flags at least ``target_sensitivity`` of the validation cases whose true Dice
  is below ``dice_below``.

Everything here is pure (arrays in, arrays out). The functions that the sliding window calls per tile
(:func:`member_statistics`) take numpy arrays or torch tensors alike.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import special

DICE_BELOW = 0.7  # a structure with a Dice below this needs a look
TARGET_SENSITIVITY = 0.9  # share of the low-Dice validation cases the calibrated flag must catch


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _xlogx(p: Any) -> Any:
    if _is_torch(p):
        import torch

        return torch.special.xlogy(p, p)
    return special.xlogy(p, p)


def _clip01(x: Any) -> Any:
    return x.clamp(0.0, 1.0) if _is_torch(x) else np.clip(x, 0.0, 1.0)


def entropy(probs: Any, regions: bool, axis: int = 0) -> Any:
    """Normalised predictive entropy in [0, 1] of probabilities with channels along ``axis`` (softmax outputs, or
    independent sigmoid ``regions``); the channel axis is reduced.

    >>> float(entropy(np.array([0.5, 0.5]), regions=False)), float(entropy(np.array([1.0, 0.0]), regions=False))
    (1.0, 0.0)
    """
    p = _clip01(probs)
    n = p.shape[axis]
    if regions:
        h = (0.0 - (_xlogx(p) + _xlogx(1.0 - p)).sum(axis)) / (math.log(2.0) * n)  # 0.0 - x: no -0.0
    else:
        if n < 2:
            raise ValueError(f"softmax probabilities need at least 2 channels, got {n}")
        h = (0.0 - _xlogx(p).sum(axis)) / math.log(n)
    return _clip01(h)


def member_statistics(logits: Any, regions: bool, axis: int = 1) -> Any:
    """One member's probabilities and their entropy, stacked along ``axis``: ``C`` probability channels, then one
    entropy channel. Summed over members (and weighted like the logits), they give the mixture and the mean member
    entropy that :func:`mutual_information` needs."""
    if _is_torch(logits):
        import torch

        p = torch.sigmoid(logits) if regions else torch.softmax(logits, axis)
        return torch.cat([p, entropy(p, regions, axis).unsqueeze(axis)], axis)
    p = special.expit(logits) if regions else special.softmax(logits, axis)
    return np.concatenate([p, np.expand_dims(entropy(p, regions, axis), axis)], axis)


def mutual_information(mixture: Any, mean_member_entropy: Any, regions: bool, axis: int = 0) -> Any:
    """``H(mixture) - mean member entropy`` in [0, 1]: the members' disagreement (see the module docstring).

    Two confident members that contradict each other: 1; members that agree: 0.

    >>> m = member_statistics(np.array([[9.0, -9.0], [-9.0, 9.0]]), regions=False, axis=1)  # 2 members, 2 classes
    >>> mix, h = m[:, :2].mean(0), m[:, 2].mean(0)
    >>> round(float(mutual_information(mix, h, regions=False)), 3)
    1.0
    """
    return _clip01(entropy(mixture, regions, axis) - mean_member_entropy)


def label_probability(probs: np.ndarray, regions_class_order: Sequence[int] | None, value: int) -> np.ndarray:
    """Probability that each voxel's label is ``value``: the softmax channel ``value``; for sigmoid regions, the
    probability that the region painting ``value`` holds the voxel and no region painted after it does (regions
    taken as independent), which is how :func:`~autoseg.labels.labels_from_probabilities` paints labels."""
    probs = np.asarray(probs, dtype=np.float32)
    if regions_class_order is None:
        return probs[value]
    out = np.zeros(probs.shape[1:], dtype=np.float32)
    for i, v in enumerate(regions_class_order):
        if v != value:
            continue
        q = probs[i].copy()
        for j in range(i + 1, len(regions_class_order)):
            if regions_class_order[j] != value:
                q *= 1.0 - probs[j]
        out = np.maximum(out, q)
    return out


def assigned_probability(probs: np.ndarray, seg: np.ndarray, regions_class_order: Sequence[int] | None) -> np.ndarray:
    """Probability of each voxel's own label in ``seg`` (a map on the probabilities' grid, float32): what a
    lesion's mean probability is taken from."""
    seg = np.asarray(seg)
    if regions_class_order is None:
        return np.take_along_axis(np.asarray(probs, dtype=np.float32), seg[None].astype(np.intp), 0)[0]
    out = np.prod(1.0 - np.asarray(probs, dtype=np.float32), axis=0)  # background: no region holds the voxel
    for v in sorted(set(regions_class_order)):
        mask = seg == v
        if mask.any():
            out[mask] = label_probability(probs, regions_class_order, v)[mask]
    return out.astype(np.float32)


def expected_dice(probs: np.ndarray, seg: np.ndarray, values: Sequence[int],
                  regions_class_order: Sequence[int] | None = None) -> dict[str, float]:
    """Expected Dice per label value (keys as in :func:`~autoseg.masks.dice_per_label`) of the label map ``seg``
    against the probabilities ``probs`` (C, ...) it came from: ``2 sum_M q / (|M| + sum q)``, or ``1 - max q``
    for a label predicted nowhere.

    >>> p = np.array([[0.1, 0.5, 1.0], [0.9, 0.5, 0.0]])  # background, label 1 on three voxels
    >>> seg = np.array([1, 1, 0])
    >>> round(expected_dice(p, seg, [1])["1"], 4)  # 2 * 1.4 / (2 + 1.4)
    0.8235
    """
    seg = np.asarray(seg)
    out = {}
    for v in values:
        q = label_probability(probs, regions_class_order, v).astype(np.float64)
        mask = seg == v
        n = int(mask.sum())
        out[str(v)] = 1.0 - float(q.max(initial=0.0)) if n == 0 else 2.0 * float(q[mask].sum()) / (n + float(q.sum()))
    return out


def lesion_confidence(probability: np.ndarray, entropy_values: np.ndarray,
                      mutual_information_values: np.ndarray | None = None) -> dict[str, float | None]:
    """Mean probability, mean entropy, mean mutual information (None without members) and confidence of one lesion
    from the map values over its voxels.

    >>> lesion_confidence(np.array([0.9, 0.7]), np.array([0.2, 0.4]))["confidence"]
    0.56
    """
    if np.size(probability) == 0:
        raise ValueError("a lesion has at least one voxel")
    p, h = float(np.mean(probability)), float(np.mean(entropy_values))
    mi = None if mutual_information_values is None else float(np.mean(mutual_information_values))
    return {"mean_probability": round(p, 4), "mean_entropy": round(h, 4),
            "mean_mutual_information": None if mi is None else round(mi, 4),
            "confidence": round(min(1.0, max(0.0, p * (1.0 - h))), 4)}


def calibrate_review(estimates: Sequence[Mapping[str, float]], dice: Sequence[Mapping[str, float]],
                     names: Mapping[str, str], dice_below: float = DICE_BELOW,
                     target_sensitivity: float = TARGET_SENSITIVITY) -> dict[str, Any]:
    """Review thresholds fitted on validation cases: per structure (keys of ``dice``), the threshold on the expected
    Dice under which a case is flagged.

    Per structure, with the validation cases whose true Dice is below ``dice_below`` ("low"): the threshold lies
    just above the ``ceil(target_sensitivity * n_low)``-th lowest expected Dice among the low cases (halfway to the
    next higher estimate of any case), the lowest threshold that flags that many of them. Without any low case the
    threshold is the lowest estimate seen, so only a case less certain than every validated one is flagged. The
    in-sample sensitivity and specificity are recorded beside it.

    >>> est = [{"1": q} for q in (0.9, 0.95, 0.5, 0.6, 0.85)]
    >>> true = [{"1": d} for d in (0.9, 0.95, 0.4, 0.65, 0.8)]
    >>> calibrate_review(est, true, {"1": "liver"})["structures"]["1"]["expected_dice_below"]
    0.725
    """
    if len(estimates) != len(dice) or not dice:
        raise ValueError(f"{len(estimates)} estimate(s) for {len(dice)} validation case(s); give one per case")
    if not 0 < target_sensitivity <= 1 or not 0 < dice_below <= 1:
        raise ValueError(f"target_sensitivity {target_sensitivity} and dice_below {dice_below} must be in (0, 1]")
    structures = {}
    for key in dice[0]:
        q = np.array([float(e[key]) for e in estimates])
        d = np.array([float(x[key]) for x in dice])
        low = d < dice_below
        if low.any():
            need = math.ceil(target_sensitivity * int(low.sum()) - 1e-9)
            cut = float(np.sort(q[low])[need - 1])
            above = q[q > cut]
            threshold = (cut + float(above.min())) / 2 if above.size else float(np.nextafter(cut, np.inf))
        else:
            threshold = float(q.min())
        flagged = q < threshold
        structures[key] = {
            "name": names.get(key, key),
            "expected_dice_below": threshold,
            "low_dice_cases": int(low.sum()),
            "cv_sensitivity": float((flagged & low).sum() / low.sum()) if low.any() else None,
            "cv_specificity": float((~flagged & ~low).sum() / (~low).sum()) if (~low).any() else None,
        }
    return {"dice_below": dice_below, "target_sensitivity": target_sensitivity, "cases": len(dice),
            "structures": structures}


def review_decision(quality: Mapping[str, float], review: Mapping[str, Any] | None) -> tuple[bool | None, list[str]]:
    """``(flag_for_review, reasons)`` of one case from its expected Dice per structure and the calibrated
    ``review`` thresholds of the inference plan; ``None`` (undecided) without thresholds.

    >>> review = {"cases": 20, "structures": {"2": {"name": "liver_tumor", "expected_dice_below": 0.6}}}
    >>> review_decision({"2": 0.45}, review)
    (True, ['liver_tumor: expected Dice 0.45 < 0.6 (threshold calibrated on 20 validation cases)'])
    """
    if not review:
        return None, ["no calibrated review thresholds in the inference plan: run `autoseg find_best_configuration` "
                      "after training"]
    reasons = []
    for key, rule in review["structures"].items():
        if key in quality and quality[key] < rule["expected_dice_below"]:
            reasons.append(f"{rule['name']}: expected Dice {quality[key]:.3g} < {rule['expected_dice_below']:.3g} "
                           f"(threshold calibrated on {review['cases']} validation cases)")
    if reasons:
        return True, reasons
    return False, ["every structure's expected Dice is at or above its calibrated threshold"]


def lesion_uncertainty(seg: np.ndarray, value: int, maps: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """:func:`lesion_confidence` of every lesion (26-connected component) of label ``value``, numbered like the
    report's lesions (1 = largest; equal sizes in scan order), with its voxel count and centroid (array index).
    ``maps``: ``probability`` (:func:`assigned_probability`), ``entropy`` and optionally ``mutual_information``."""
    from scipy import ndimage

    from ..masks import connected_components

    cc, n = connected_components(np.asarray(seg) == value)
    if n == 0:
        return []
    sizes = np.bincount(cc.ravel(), minlength=n + 1)[1:]
    centroids = np.asarray(ndimage.center_of_mass(cc > 0, cc, np.arange(1, n + 1)), dtype=np.float64)
    centroids = centroids.reshape(n, cc.ndim)
    mi = maps.get("mutual_information")
    rows = []
    for rank, k in enumerate(np.argsort(-sizes, kind="stable"), start=1):
        mask = cc == k + 1
        rows.append({"lesion": rank, "voxels": int(sizes[k]),
                     "centroid_index": [round(float(c), 3) for c in centroids[k]],
                     **lesion_confidence(maps["probability"][mask], maps["entropy"][mask],
                                         None if mi is None else mi[mask])})
    return rows


def case_uncertainty(probs: np.ndarray, seg: np.ndarray, regions_class_order: Sequence[int] | None,
                     names: Mapping[int, str], tumour_values: Sequence[int],
                     mutual_info: np.ndarray | None = None, review: Mapping[str, Any] | None = None,
                     ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The uncertainty maps and summary of one predicted case.

    ``probs`` (C, ...) are the averaged probabilities ``seg`` (the final, postprocessed labels) came from,
    ``names`` the label value -> name of every predicted value, ``mutual_info`` the members' map (None with a
    single member) and ``review`` the calibrated thresholds of the inference plan.

    Returns ``maps`` (float32 on the grid of ``seg``: ``entropy``, ``probability`` of each voxel's label and, with
    members, ``mutual_information``) and the summary: ``expected_dice`` per value, ``flag_for_review`` and
    ``reasons`` (:func:`review_decision`), mean entropy and mutual information over the predicted foreground, and
    per tumour lesion its :func:`lesion_uncertainty`.
    """
    regions = regions_class_order is not None
    maps = {"entropy": entropy(probs, regions).astype(np.float32),
            "probability": assigned_probability(probs, seg, regions_class_order)}
    if mutual_info is not None:
        maps["mutual_information"] = np.clip(mutual_info, 0.0, 1.0).astype(np.float32)
    quality = expected_dice(probs, seg, sorted(names), regions_class_order)
    flag, reasons = review_decision(quality, review)
    foreground = np.asarray(seg) > 0
    lesions = []
    for v in tumour_values:
        lesions += [{"structure": names[v], "value": int(v), **row} for row in lesion_uncertainty(seg, v, maps)]

    def fg_mean(key: str) -> float | None:
        if key not in maps:
            return None
        return round(float(maps[key][foreground].mean()), 5) if foreground.any() else 0.0

    summary = {
        "expected_dice": {k: round(q, 5) for k, q in quality.items()},
        "structures": {str(v): names[v] for v in sorted(names)},
        "flag_for_review": flag,
        "reasons": reasons,
        "mean_foreground_entropy": fg_mean("entropy"),
        "mean_foreground_mutual_information": fg_mean("mutual_information"),
        "lesions": lesions,
    }
    return maps, summary
