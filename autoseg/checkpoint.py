"""Where a network runs, how its weights and training state are saved and loaded, and how a run starts from
another model's weights (``train --init-from``).

Weights are safetensors (never unpickled); the ``--continue`` state is a ``torch.save`` of tensors and primitives
only, read back with ``weights_only=True``. Both are written atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_path, check_zip
from .errors import AutosegError
from .layout import checkpoint_file, state_file


def pick_device(choice: str) -> torch.device:
    """``auto`` is CUDA when torch sees a GPU, else the CPU; asking for CUDA without one is an error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise AutosegError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(choice)


def _non_finite(weights: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding NaN or Inf."""
    return [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save_checkpoint(folder: Path, name: str, model: torch.nn.Module, state: dict[str, Any] | None = None) -> None:
    """Weights as safetensors; optional training state via ``torch.save`` of tensors and primitives only.

    Weights holding NaN/Inf are refused: a diverged run must not leave a checkpoint that predicts only background.
    """
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    bad = _non_finite(weights)
    if bad:
        raise AutosegError(f"{checkpoint_file(folder, name)}: training diverged, {len(bad)} weight tensor(s) hold "
                           f"NaN/Inf (first: {bad[0]}); nothing was saved. Lower --lr, or continue from the last good "
                           "checkpoint_latest with --continue")
    with atomic_path(checkpoint_file(folder, name), lambda p: load_file(str(p))) as tmp:
        save_file(weights, str(tmp))
    if state is not None:
        with atomic_path(state_file(folder, name), check_zip) as tmp:
            torch.save(state, tmp)


def fit_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Load ``weights`` into ``model`` after checking every name, shape and value, so a checkpoint from other plans,
    another ``--encoder`` or a damaged file is an error naming ``source`` instead of a size-mismatch traceback."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [f"{k} {tuple(weights[k].shape)} (network: {tuple(v.shape)})" for k, v in expected.items()
             if k in weights and tuple(weights[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        raise AutosegError(f"{source}: weights do not fit the planned network (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}, wrong shape {wrong[:3]}); it was trained with other plans or --encoder, "
                           "or the file was edited: retrain the fold or restore the model folder")
    bad = _non_finite(weights)
    if bad:
        raise AutosegError(f"{source}: {len(bad)} weight tensor(s) hold NaN/Inf (first: {bad[0]}); the run that "
                           "wrote it diverged: retrain with a lower --lr")
    model.load_state_dict(weights)


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Load safetensors weights into ``model``; a file that does not fit the network is an error naming it."""
    try:
        weights = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise AutosegError(f"{path}: not a readable safetensors checkpoint ({e})") from None
    fit_weights(model, weights, path)


STATE_KEYS = ("model", "optimizer", "torch_rng", "epoch", "ema", "best", "elapsed", "log")


def load_state(folder: Path, name: str = "latest") -> dict[str, Any]:
    """The training state saved with ``checkpoint_<name>`` (tensors and primitives only); a damaged or edited file
    is an error naming it."""
    path = state_file(folder, name)
    fix = f"delete {path} and {checkpoint_file(folder, name)} and train again without --continue"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a pickle of anything but tensors and primitives, ...
        raise AutosegError(f"{path}: not a readable training state ({type(e).__name__}: {str(e)[:200]}); {fix}") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise AutosegError(f"{path}: training state lacks {missing}; {fix}")
    if not isinstance(state["epoch"], int) or state["epoch"] < 0 or not isinstance(state["log"], list):
        raise AutosegError(f"{path}: training state has epoch {state['epoch']!r}; {fix}")
    return state


# ------------------------------------------------------------------------------------- starting from another model


@dataclass(frozen=True)
class InitSource:
    """Weights to start a training run from (``train --init-from``) and the plans entry they were trained with."""

    config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    where: str


def _structure(config: dict[str, Any]) -> dict[str, Any]:
    """What fixes a network's weight names and inner shapes, with the optional plan keys filled in."""
    net = config["network"]
    n = len(net["features"])
    return {"dims": config["dims"], "stages": n, "encoder": net["encoder"], "stem": bool(net.get("stem", False)),
            "features": list(net["features"]), "kernel_sizes": [list(k) for k in net["kernel_sizes"]],
            "strides": [list(s) for s in net["strides"]],
            "encoder_convs": list(net.get("encoder_convs", [net["convs_per_stage"]] * n)),
            "decoder_convs": list(net.get("decoder_convs", [net["convs_per_stage"]] * (n - 1)))}


def plan_differences(config: dict[str, Any], source: dict[str, Any]) -> list[str]:
    """How the network of ``source`` (a plans configuration) differs from ``config``'s, beyond the input channels
    and outputs: each difference means its weights cannot be carried over."""
    ours, theirs = _structure(config), _structure(source)
    for key in ("dims", "stages"):  # the rest compares stage by stage, meaningless when these differ
        if ours[key] != theirs[key]:
            return [f"{key} {theirs[key]} (this configuration: {ours[key]})"]
    return [f"{key} {theirs[key]} (this configuration: {ours[key]})" for key in ours if ours[key] != theirs[key]]


def init_from(model: torch.nn.Module, config: dict[str, Any], source: InitSource) -> dict[str, Any]:
    """Load every tensor of ``source`` whose name and shape fit ``model``; the rest (a head for other labels, a
    first conv for another number of input channels) keeps its initialisation and is listed in the returned
    report. Plans whose network differs otherwise (dims, stages, features, kernels, strides, encoder) are an
    error naming each difference: their weights would fit nowhere or mean something else."""
    problems = plan_differences(config, source.config)
    if problems:
        raise AutosegError(f"--init-from {source.where}: its network does not fit this configuration's "
                           f"({'; '.join(problems)}); start from a model trained with the same network plan "
                           "(re-plan this dataset like the source, or pick its configuration), or train from scratch")
    bad = _non_finite(source.weights)
    if bad:
        raise AutosegError(f"--init-from {source.where}: {len(bad)} weight tensor(s) hold NaN/Inf (first: {bad[0]})")
    loaded, kept = {}, []
    for key, ref in model.state_dict().items():
        w = source.weights.get(key)
        if w is not None and tuple(w.shape) == tuple(ref.shape):
            loaded[key] = w
        else:
            kept.append(f"{key} {tuple(ref.shape)} (source: {'absent' if w is None else tuple(w.shape)})")
    model.load_state_dict(loaded, strict=False)
    return {"source": source.where, "loaded": len(loaded), "initialised": kept}
