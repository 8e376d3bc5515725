"""autoseg: self-configuring segmentation for liver and kidney tumours in CT.

``autoseg.segment``, ``autoseg.load_model``, ``autoseg.Model`` and ``autoseg.Segmentation`` are the Python API
(:mod:`autoseg.api`); they are loaded on first use (PEP 562), so importing any other module of the package does not
load the models' stack.
"""

from typing import Any

from .version import __version__

__all__ = ["__version__", "segment", "load_model", "Model", "Segmentation"]

_API = ("segment", "load_model", "Model", "Segmentation")


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'autoseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
