"""What the label values of a dataset mean: the one owner of ``dataset.json`` ``labels``.

Label maps are stored as uint8, so every label value is an integer 0-255 and ``background`` is 0. A label given as
a list of values is a region (nnU-Net convention): such a dataset is region-based, trained with one sigmoid output
per non-background label, and ``regions_class_order`` says which value each region paints, in order. Tumour labels
are those named ``X_tumor``/``X_tumour``/``X_lesion``; their organ is label ``X`` when it exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import AutosegError

# The phantom's labels, and the default of the report when no dataset.json is given.
DEFAULT_LABELS: dict[str, int] = {"background": 0, "liver": 1, "liver_tumor": 2, "kidney": 3, "kidney_tumor": 4}
_TUMOUR_RE = re.compile(r"^(?:(?P<organ>.+?)[ _\-]?)?(tumou?rs?|lesions?)$", re.IGNORECASE)

LabelValue = int | tuple[int, ...]


def _valid_value(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and 0 <= x < 256


def label_problems(labels: Any) -> list[str]:
    """Every problem of a ``labels`` mapping (empty when usable), each naming the key, the value and the fix."""
    if not isinstance(labels, Mapping):
        return [f"'labels' must be a mapping name -> value or list of values, found {labels!r}; "
                "e.g. {\"background\": 0, \"liver\": 1}"]
    problems = []
    if labels.get("background") != 0:
        problems.append(f"'labels' must map 'background' to 0, found {labels.get('background')!r}; "
                        "add \"background\": 0")
    for name, value in labels.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values or not all(_valid_value(v) for v in values):
            problems.append(f"label '{name}' must be an integer 0-255 or a list of them, found {value!r}; "
                            "label maps are stored as uint8")
    return problems


def check_labels(labels: Any) -> dict[str, LabelValue]:
    """``labels`` with list values as tuples; raises ``ValueError`` listing every :func:`label_problems`."""
    problems = label_problems(labels)
    if problems:
        raise ValueError("; ".join(problems))
    return {str(n): tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else int(v) for n, v in labels.items()}


def _check_region(name: str, values: Sequence[int]) -> tuple[int, ...]:
    if not values or not all(_valid_value(v) for v in values):
        raise ValueError(f"region '{name}' must be a list of integers 0-255, found {list(values)!r}")
    return tuple(sorted({int(v) for v in values} - {0}))


def labels_from_probabilities(probs: np.ndarray, regions_class_order: Sequence[int] | None) -> np.ndarray:
    """Label map from (C, ...) probabilities: argmax for softmax outputs; for regions, each region (p > 0.5)
    paints its label in ``regions_class_order`` order, so nested regions end with the innermost label."""
    if regions_class_order is None:
        return probs.argmax(0).astype(np.uint8)
    seg = np.zeros(probs.shape[1:], dtype=np.uint8)
    for i, label in enumerate(regions_class_order):
        seg[probs[i] > 0.5] = label
    return seg


@dataclass(frozen=True)
class LabelSpec:
    """A checked ``labels`` mapping (and ``regions_class_order`` of a region-based dataset)."""

    labels: Mapping[str, LabelValue]
    regions_class_order: tuple[int, ...] | None = None

    @classmethod
    def from_labels(cls, labels: Any) -> "LabelSpec":
        """From a bare ``labels`` mapping; raises ``ValueError`` naming every bad key."""
        return cls(check_labels(labels))

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "LabelSpec":
        """From ``dataset.json``; raises :class:`AutosegError` naming every bad key."""
        try:
            labels = check_labels(meta.get("labels"))
        except ValueError as e:
            raise AutosegError(f"dataset.json: {e}") from None
        rco = meta.get("regions_class_order")
        if rco is not None and (not isinstance(rco, list) or not all(_valid_value(v) and v > 0 for v in rco)):
            raise AutosegError(f"dataset.json: 'regions_class_order' must be a list of label values 1-255, found "
                               f"{str(rco)[:80]}; list the value each region paints, in the order of the regions")
        return cls(labels, None if rco is None else tuple(int(v) for v in rco))

    @property
    def values(self) -> list[int]:
        """All integer values a label map may contain (regions contribute their member values)."""
        out: set[int] = set()
        for v in self.labels.values():
            out.update(v if isinstance(v, tuple) else [v])
        return sorted(out)

    @property
    def names(self) -> dict[int, str]:
        """Value -> name of the single-value labels."""
        return {v: n for n, v in self.labels.items() if isinstance(v, int)}

    def layout(self) -> tuple[int, list[list[int]] | None, list[int] | None]:
        """(number of network outputs, regions or None, regions_class_order or None)."""
        labels = {k: v for k, v in self.labels.items() if k != "background"}
        if any(isinstance(v, tuple) for v in labels.values()):
            if self.regions_class_order is None:
                raise AutosegError("dataset.json declares regions (a label given as a list) but no "
                                   "'regions_class_order'; add it, listing the value each region paints")
            regions = [list(v) if isinstance(v, tuple) else [v] for v in labels.values()]
            if len(self.regions_class_order) != len(regions):
                raise AutosegError(f"dataset.json: 'regions_class_order' has {len(self.regions_class_order)} "
                                   f"value(s) {list(self.regions_class_order)} but there are {len(regions)} regions "
                                   f"({', '.join(labels)}); give exactly one value per region, in that order")
            return len(regions), regions, list(self.regions_class_order)
        values = sorted([0] + list(labels.values()))
        if values != list(range(len(values))):
            raise AutosegError(f"dataset.json labels must be consecutive 0..{len(values) - 1}, found {values}")
        return len(values), None, None

    def predicted_values(self) -> list[int]:
        """The label values a trained model paints, the ones validation and model selection score."""
        _, _, rco = self.layout()
        return sorted(set(rco) if rco else {v for k, v in self.labels.items() if k != "background"})

    def tumour_values(self) -> list[int]:
        """Values of the single-value labels named like a tumour (``liver_tumor``, ``kidney_tumour``, ``lesion``)."""
        return sorted(v for n, v in self.labels.items() if isinstance(v, int) and v and _TUMOUR_RE.match(n))

    def tumour_organs(self) -> dict[int, tuple[str, str, int | None]]:
        """tumour value -> (tumour name, organ name, organ value or None when the organ has no label)."""
        by_lower = {n.lower(): (n, v) for n, v in self.labels.items() if isinstance(v, int) and v}
        names = self.names
        out = {}
        for value in self.tumour_values():
            organ = _TUMOUR_RE.match(names[value]).group("organ") or ""
            if organ.lower() in by_lower:
                out[value] = (names[value], by_lower[organ.lower()][0], by_lower[organ.lower()][1])
            else:
                out[value] = (names[value], names[value], None)
        return out

    def default_regions(self) -> dict[str, list[int]]:
        """``X_region`` = [X, X_tumor] for every organ/tumour pair: organ regions that include their tumour."""
        plain = {n.lower(): (n, v) for n, v in self.labels.items() if isinstance(v, int) and v != 0}
        regions = {}
        for name, value in self.labels.items():
            m = _TUMOUR_RE.match(name)
            if isinstance(value, int) and value != 0 and m and (m.group("organ") or "").lower() in plain:
                organ, organ_value = plain[m.group("organ").lower()]
                regions[f"{organ}_region"] = [organ_value, value]
        return regions

    def structures(self, regions: Mapping[str, Sequence[int]] | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Everything to evaluate: ``name -> (kind, values)``, kind ``label`` or ``region``; ``regions`` default to
        :meth:`default_regions`."""
        out: dict[str, tuple[str, tuple[int, ...]]] = {}
        for name, v in self.labels.items():
            if isinstance(v, int):
                if v != 0:
                    out[name] = ("label", (v,))
            else:
                values = tuple(sorted(set(v) - {0}))
                if values:
                    out[name] = ("region", values)
        extra = self.default_regions() if regions is None else regions
        for name, values in extra.items():
            vals = _check_region(name, list(values))
            if name in out and out[name][0] == "label":
                raise ValueError(f"region name {name!r} is already a label name; rename the region")
            out[name] = ("region", vals)
        return out


def label_layout(meta: Mapping[str, Any]) -> tuple[int, list[list[int]] | None, list[int] | None]:
    """(number of outputs, regions or None, regions_class_order or None) from ``dataset.json``."""
    return LabelSpec.from_meta(meta).layout()


def default_regions(labels: Mapping[str, Any]) -> dict[str, list[int]]:
    """Organ regions that include their tumour: for each pair ``X`` / ``X_tumor`` (or ``X_tumour``, ``X tumor``,
    ``X_lesion``), ``X_region`` = [X, X_tumor].

    >>> default_regions({"background": 0, "liver": 1, "liver_tumor": 2, "kidney": 3, "kidney_tumor": 4})
    {'liver_region': [1, 2], 'kidney_region': [3, 4]}
    """
    return LabelSpec.from_labels(labels).default_regions()


def tumour_label_values(labels: Mapping[str, Any]) -> list[int]:
    """Values of the single-value labels whose name ends in tumor/tumour/lesion (e.g. ``liver_tumor``).

    >>> tumour_label_values({"background": 0, "liver": 1, "liver_tumor": 2, "kidney": 3, "kidney_tumour": 4})
    [2, 4]
    """
    return LabelSpec.from_labels(labels).tumour_values()


def structures_from_labels(
    labels: Mapping[str, Any], regions: Mapping[str, Sequence[int]] | None = None
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Everything to evaluate: ``name -> (kind, values)`` with kind ``label`` or ``region``.

    Single-value labels other than background (0) are labels; list-valued labels (region-based dataset.json)
    are regions; then ``regions`` (default :func:`default_regions`) are added.

    >>> structures_from_labels({"background": 0, "kidney": 3, "kidney_tumor": 4})
    {'kidney': ('label', (3,)), 'kidney_tumor': ('label', (4,)), 'kidney_region': ('region', (3, 4))}
    """
    return LabelSpec.from_labels(labels).structures(regions)
