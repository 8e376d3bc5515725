"""Which model made a prediction: a digest that changes whenever a rerun would predict something else.

It covers every network's weights and buffers as loaded (so a retrained fold, another fold set or a model from a
bundle with other weights differ, while the same weights unpacked again from a bundle do not), each configuration's
plans entry, the sliding-window step and mirroring, and the postprocessing. Not the numeric precision: that is
measured on each machine and changes the labels of a few voxels at most. ``predict`` records it beside each case's
outputs (:mod:`autoseg.io.outputs`) and predicts a case again when the record names another model.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import torch
from torch import nn


def _weights(h: Any, net: nn.Module) -> None:
    for name, tensor in net.state_dict().items():
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def weights_digest(net: nn.Module) -> bytes:
    """SHA-256 of a network's weights and buffers as loaded (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    _weights(h, net)
    return h.digest()


def model_identity(predictors: Sequence[Any], postprocessing: dict | None) -> str:
    """A SHA-256 hex digest of what the :class:`~autoseg.inference.predictor.Predictor` s (averaged, in order)
    and the postprocessing would predict with."""
    h = hashlib.sha256()
    stack = list(predictors)
    while stack:
        p = stack.pop(0)
        settings = {"configuration": p.configuration, "config": p.config, "mirror": p.mirror, "step": p.step,
                    "folds": len(p.models)}
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
        for net in p.models:
            _weights(h, net)
        if p.stage1 is not None:
            stack.insert(0, p.stage1)
    h.update(json.dumps(postprocessing, sort_keys=True, default=str).encode())
    return h.hexdigest()
