"""What ``train --init-from MODEL`` starts from: a model bundle, an autoseg results folder (dataset, configuration
or fold), or an nnU-Net v2 trainer folder (converted in memory as ``autoseg import-nnunet`` would).

Of a model with several folds the one trained on every case (``all``) is taken, else the lowest-numbered fold.
Which of its tensors fit the new network is decided by :func:`autoseg.checkpoint.init_from`.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from .bundle import fold_sort_key, open_bundle
from .checkpoint import InitSource
from .errors import AutosegError
from .jsonfile import read_json
from .layout import PLANS_JSON, checkpoint_file, fold_dir, trained_folds
from .nnunet import convert_model


def _pick_fold(folds: list[str]) -> str:
    return "all" if "all" in folds else sorted(folds, key=fold_sort_key)[0]


def _config_dir(path: Path, configuration: str) -> Path:
    """The configuration folder under a results dataset folder, a configuration folder, or a fold folder."""
    if path.name.startswith("fold_") and (path.parent / PLANS_JSON).is_file():
        return path.parent
    if (path / PLANS_JSON).is_file():
        return path
    trained = sorted(p for p in path.iterdir() if p.is_dir() and trained_folds(p)) if path.is_dir() else []
    if (path / configuration) in trained:
        return path / configuration
    if len(trained) == 1:
        return trained[0]
    raise AutosegError(f"--init-from {path}: not a model (a bundle .zip, an autoseg results folder with trained "
                       f"folds, or an nnU-Net v2 trainer folder); trained configurations here: "
                       f"{[p.name for p in trained] or 'none'}; name one, e.g. --init-from {path}/3d_fullres")


def _from_results(path: Path, configuration: str, where: str) -> InitSource:
    config_dir = _config_dir(path, configuration)
    folds = [path.name.removeprefix("fold_")] if path.name.startswith("fold_") else trained_folds(config_dir)
    if not folds or not checkpoint_file(fold_dir(config_dir, folds[0]), "final").is_file():
        raise AutosegError(f"--init-from {path}: no fold with checkpoint_final.safetensors; finish training it first")
    fold = _pick_fold(folds)
    plans = read_json(config_dir / PLANS_JSON, "give a model folder written by autoseg train or import", "plans")
    if config_dir.name not in plans["configurations"]:
        raise AutosegError(f"--init-from {config_dir}: plans.json has no configuration {config_dir.name}")
    weights_path = checkpoint_file(fold_dir(config_dir, fold), "final")
    try:
        weights = load_file(str(weights_path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise AutosegError(f"{weights_path}: not a readable safetensors checkpoint ({e})") from None
    return InitSource(plans["configurations"][config_dir.name], weights, f"{where} ({config_dir.name}, fold {fold})")


def init_source(path: Path, configuration: str) -> InitSource:
    """The weights and plans entry ``--init-from path`` names; ``configuration`` (the one being trained) picks the
    source configuration when a dataset folder or bundle holds several."""
    path = Path(path)
    if not path.exists():
        raise AutosegError(f"--init-from {path}: no such file or folder")
    if path.is_file():
        return _from_results(open_bundle(path), configuration, str(path))
    if (path / PLANS_JSON).is_file() and any(path.glob("fold_*/checkpoint_*.pth")):
        folds = sorted(p.parent.name.removeprefix("fold_") for p in path.glob("fold_*/checkpoint_final.pth"))
        if not folds:
            raise AutosegError(f"--init-from {path}: no fold_<k>/checkpoint_final.pth; finish training it first")
        model = convert_model(path, folds=[_pick_fold(folds)])
        fold, net = next(iter(model.folds.items()))
        return InitSource(model.plans["configurations"][model.configuration], net.state_dict(),
                          f"{path} (nnU-Net {model.configuration}, fold {fold})")
    return _from_results(path, configuration, str(path))
