"""Latency per 512x512 axial slice of the `2d` configuration, per engine, batch 1 and batched.

The seeds claim real time (under 50 ms per frame). This measures the sliding window of `autoseg predict` on one
512x512 slice (batch 1) and on a stack of slices whose tiles go through the network together (batched), without
mirroring, step 0.5, for the KiTS19 fingerprint's `2d` plans:
- the GPU plan (nnU-Net-sized: patch 512x512, 32 base features, 7 stages): one tile per slice;
- the CPU plan (what autoseg trains on a CPU: patch 192x192, 8 base features): 9 tiles per slice.
Each engine installed runs on the CPU (torch with its measured precision); torch also on CUDA when a GPU is there.
Weights are random (latency does not depend on them). Rounds are interleaved across engines and the fastest round
counts, so a load burst from other processes on a shared machine does not decide a row.

    python benchmarks/bench_slice.py [--rounds 3] [--batch 8] [--plans gpu cpu]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402

from autoseg.inference.engines import ENGINES, runtime_network  # noqa: E402
from autoseg.inference.predictor import probe_precision, sliding_window, tile_starts  # noqa: E402
from autoseg.network import build_network  # noqa: E402
from autoseg.planning.planner import plan  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SLICE = 512
OUTPUTS = 3  # KiTS19: background, kidney, tumour


def _targets(config: dict, batch: int) -> list[tuple[str, str, torch.nn.Module, object]]:
    """(engine, device, network, precision) for every engine installed, plus torch on CUDA where there is one."""
    net = build_network(config, 1, OUTPUTS).eval()
    net.deep_supervision = False
    patch = config["patch_size"]
    tiles = batch * _tiles_per_slice(patch)
    out = []
    for engine in ENGINES:
        if engine != "torch" and importlib.util.find_spec(engine) is None:
            print(f"{engine}: not installed, skipped")
            continue
        if engine == "torch":
            precision = probe_precision([net], patch, 1, torch.device("cpu"), tile_batch=min(tiles, 8))
            out.append((engine, "cpu", net, precision))
        else:
            out.append((engine, "cpu", runtime_network(engine, net, 1, patch), None))
    if torch.cuda.is_available():
        gpu = build_network(config, 1, OUTPUTS).eval().cuda()
        gpu.deep_supervision = False
        gpu.load_state_dict(net.state_dict())
        out.append(("torch", "cuda", gpu, probe_precision([gpu], patch, 1, torch.device("cuda"))))
    return out


def _tiles_per_slice(patch: list[int]) -> int:
    return len(tile_starts(SLICE, patch[0], 0.5)) * len(tile_starts(SLICE, patch[1], 0.5))


def _time(net: torch.nn.Module, data: torch.Tensor, config: dict, device: str, precision: object,
          tile_batch: int) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    sliding_window(net, data, config["patch_size"], OUTPUTS, step=0.5, tile_batch=tile_batch, device=device,
                   precision=precision)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds per row (fastest counts)")
    parser.add_argument("--batch", type=int, default=8, help="slices per call in the batched rows (default 8)")
    parser.add_argument("--plans", nargs="+", default=["gpu", "cpu"], choices=["gpu", "cpu"],
                        help="which KiTS19 2d plans to measure")
    args = parser.parse_args()
    fingerprint = json.loads((REPO / "fingerprints" / "kits19.json").read_text())
    rows = []
    for target in args.plans:
        config = plan(fingerprint, device=target)["configurations"]["2d"]
        tiles_per_slice = _tiles_per_slice(config["patch_size"])
        engines = _targets(config, args.batch)
        shapes = {1: torch.randn((1, 1, SLICE, SLICE)), args.batch: torch.randn((1, args.batch, SLICE, SLICE))}
        best: dict[tuple[int, int], float] = {}
        for r in range(args.rounds + 1):  # round 0 warms up (allocations, graph compilation)
            for i, (engine, device, net, precision) in enumerate(engines):
                for slices, data in shapes.items():
                    seconds = _time(net, data, config, device, precision, slices * tiles_per_slice) / slices
                    if r:
                        best[(i, slices)] = min(best.get((i, slices), float("inf")), seconds)
        for (i, slices), seconds in sorted(best.items()):
            engine, device, net, precision = engines[i]
            mode = getattr(precision, "mode", None) or "fp32"
            rows.append({"plan": target, "patch": "x".join(map(str, config["patch_size"])),
                         "features": config["network"]["features"][0], "tiles_per_slice": tiles_per_slice,
                         "engine": engine, "device": device, "precision": mode, "slices_per_call": slices,
                         "ms_per_slice": round(seconds * 1000, 1),
                         "under_50ms": seconds < 0.05, "threads": torch.get_num_threads()})
            print(rows[-1], flush=True)
    report("slice", rows, ["plan", "patch", "features", "tiles_per_slice", "engine", "device", "precision",
                           "slices_per_call", "ms_per_slice", "under_50ms"])


if __name__ == "__main__":
    main()
