"""Where a network runs, and how its weights and training state are saved and loaded.

Weights are safetensors (never unpickled); the ``--continue`` state is a ``torch.save`` of tensors and primitives
only, read back with ``weights_only=True``. Both are written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_path
from .errors import AutosegError
from .layout import checkpoint_file, state_file


def pick_device(choice: str) -> torch.device:
    """``auto`` is CUDA when torch sees a GPU, else the CPU; asking for CUDA without one is an error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise AutosegError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(choice)


def save_checkpoint(folder: Path, name: str, model: torch.nn.Module, state: dict[str, Any] | None = None) -> None:
    """Weights as safetensors; optional training state via ``torch.save`` of tensors and primitives only."""
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(checkpoint_file(folder, name)) as tmp:
        save_file(weights, str(tmp))
    if state is not None:
        with atomic_path(state_file(folder, name)) as tmp:
            torch.save(state, tmp)


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Load safetensors weights into ``model``; a file that does not fit the network is an error naming it."""
    try:
        weights = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise AutosegError(f"{path}: not a readable safetensors checkpoint ({e})") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise AutosegError(f"{path}: weights do not fit the planned network (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}); was it trained with other plans or --encoder?")


def load_state(folder: Path, name: str = "latest") -> dict[str, Any]:
    """The training state saved with ``checkpoint_<name>`` (tensors and primitives only)."""
    return torch.load(state_file(folder, name), map_location="cpu", weights_only=True)
