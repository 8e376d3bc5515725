"""Seconds per training iteration at the plan's patch and batch, data loading included and network step alone.

Both plans are measured on the bench phantom: the GPU plan (8 GB budget, nnU-Net's sizing, compared with
nnU-Net v2's 36.0 s per 3d_fullres step from shared/reference/peer_figures.md; that figure came from a CPU with
AVX-512, and side by side on one machine nnU-Net's own network takes the same time as ours, see RESULTS.md) and
the CPU plan that autoseg uses when no GPU is present. Peak RSS is this process's maximum resident memory.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402

from autoseg.cli import main as cli  # noqa: E402
from autoseg.training.data import BatchLoader  # noqa: E402
from autoseg.training.losses import SegmentationLoss  # noqa: E402
from autoseg.network import build_network, count_parameters, ds_scales  # noqa: E402
from autoseg.phantom import write_dataset  # noqa: E402
from autoseg.planning.planner import plan  # noqa: E402
from autoseg.checkpoint import pick_device  # noqa: E402
from autoseg.precision import Precision, probe  # noqa: E402
from autoseg.training.trainer import train_steps  # noqa: E402

NNUNET_3D_STEP_S = 36.0  # nnU-Net v2.8.1, 3d_fullres 128x80x128 batch 2, 31 M parameters, 2 CPU cores
ITERS = {"gpu": 2, "cpu": 5}
NAME = "Dataset901_BenchTrain"


def measure(config: dict, data_folder: Path, case_ids: list[str], device: torch.device, iters: int,
            requested: str) -> dict:
    """Seconds per training iteration with data loading and per step alone, in precision ``requested``
    (``auto``: what the trainer's probe picks on this machine)."""
    torch.manual_seed(0)
    net = build_network(config, 1, 5).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    loss_fn = SegmentationLoss(len(config["network"]["strides"]) - 1, batch_dice=config["dims"] == 3)
    workers = max(0, min(8, (os.cpu_count() or 1) - 2))
    loader = BatchLoader(data_folder, case_ids, config, ds_scales(config), seed=0, num_workers=workers)
    batch = next(loader)
    x, targets = batch["data"].to(device), [t.to(device) for t in batch["target"]]

    def run(mode: str, channels_last: bool) -> torch.Tensor:
        fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        net.to(memory_format=fmt)
        net.zero_grad(set_to_none=True)
        with Precision(mode, channels_last).autocast(device):
            loss = loss_fn(net(x.contiguous(memory_format=fmt)), targets)
        loss.backward()
        return loss.detach().float()

    precision = probe(run, device, config["dims"], requested, repeats=1)
    net.to(memory_format=torch.channels_last_3d if precision.channels_last else torch.contiguous_format)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.mode == "fp16")
    args = (device, precision, scaler, 12.0)
    train_steps(net, loss_fn, opt, loader, 1, *args)  # warm-up: workers, allocator, kernels
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    train_steps(net, loss_fn, opt, loader, iters, *args)
    sync()
    with_data = (time.perf_counter() - t) / iters
    loader.close()
    t = time.perf_counter()
    train_steps(net, loss_fn, opt, itertools.repeat(batch), iters, *args)
    sync()
    step = (time.perf_counter() - t) / iters
    name = precision.mode + ("+channels_last" if precision.channels_last else "")
    return {"precision": name if requested != "auto" else f"auto: {name}", "s_per_iter": round(with_data, 3),
            "step_s": round(step, 3), "params_M": round(count_parameters(net) / 1e6, 2)}


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="autoseg-bench-train-"))
    try:
        os.environ.update(AUTOSEG_RAW=str(work / "raw"), AUTOSEG_PREPROCESSED=str(work / "pp"))
        write_dataset(work / "raw", 10, seed=321, size="bench", dataset_name=NAME)
        assert cli(["plan_and_preprocess", "-d", NAME, "-c", "3d_fullres", "-np", "2", "--device", "gpu"]) == 0
        pp = work / "pp" / NAME
        fingerprint = json.loads((pp / "fingerprint.json").read_text())
        folder = pp / "3d_fullres"
        case_ids = sorted(p.stem for p in folder.glob("*.json"))
        device = pick_device("auto")
        rows = []
        for target in ("gpu", "cpu"):
            # the GPU plan on a CPU is only the side-by-side with nnU-Net's step (fp32): its probe would take minutes
            modes = ("fp32",) if target == "gpu" and device.type == "cpu" else ("fp32", "auto")
            for name, requested in itertools.product(("2d", "3d_fullres"), modes):
                config = plan(fingerprint, device=target)["configurations"][name]
                m = measure(config, folder, case_ids, device, ITERS[target], requested)
                row = {"plan": target, "configuration": name, "patch": "x".join(map(str, config["patch_size"])),
                       "batch": config["batch_size"], **m,
                       "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
                       "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
                if target == "gpu" and name == "3d_fullres" and device.type == "cpu":  # fp32, as nnU-Net ran
                    row["nnunet_step_s"] = NNUNET_3D_STEP_S
                    row["speedup_vs_nnunet"] = round(NNUNET_3D_STEP_S / m["step_s"], 2)
                if device.type == "cuda":
                    row["peak_vram_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
                rows.append(row)
                print(row, flush=True)
        report("train", rows, ["plan", "configuration", "precision", "patch", "batch", "params_M", "s_per_iter", "step_s",
                               "peak_rss_gb", "nnunet_step_s", "speedup_vs_nnunet", "device"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
