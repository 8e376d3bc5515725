"""Where the network's forward pass on a batch of tiles runs: torch, or the same weights exported to ONNX and run by
ONNX Runtime or OpenVINO.

Only that forward pass changes. A runtime engine is wrapped as a module that takes the tile batch the torch network
takes and returns the logits it returns, so the sliding window, mirroring, Gaussian weighting, fold averaging and
everything after them are one code path for every engine.

The ONNX graph is exported from the loaded torch weights with torch's TorchScript exporter (opset 17, batch and
spatial axes dynamic). torch's default dynamo exporter gives the same graph but took 27 s per export on a 2-core
CPU against 2 s, and ``predict --engine`` exports every fold when it loads: exporting from the safetensors each time
means an ONNX graph can never be stale against the weights it came from. The runtimes run float32 (OpenVINO is told
so: on CPUs with bf16 units it would otherwise pick bf16 by itself and change the logits).
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import AutosegError
from ..precision import MIN_GAIN, Precision
from .identity import weights_digest

ENGINES = ("torch", "onnxruntime", "openvino")
CHOICES = ("auto", *ENGINES)
OPSET = 17
# The pip extra that installs what each engine (and the export) needs.
EXTRAS = {"onnx": "onnx", "onnxruntime": "onnx", "openvino": "openvino"}
# Largest |logit difference| to torch on random input, relative to the largest |logit|, that an exported graph may
# show (float32 kernels differ in summation order only: measured 1e-6 to 1e-5 here).
MAX_RELATIVE_DIFF = 1e-3


def require(package: str, purpose: str) -> ModuleType:
    """Import ``package`` (``onnx``, ``onnxruntime``, ``openvino``) or say which extra installs it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise AutosegError(f"{purpose} needs the package {package}, which is not installed; install it with: "
                           f"pip install 'autoseg[{EXTRAS[package]}]'") from None


def export_onnx(net: nn.Module, in_channels: int, patch: Sequence[int]) -> bytes:
    """The network's inference graph (full-resolution logits only) as ONNX bytes, with dynamic batch and spatial
    axes named ``batch``, ``z``, ``y``, ``x`` (``y``, ``x`` for a 2D network); input ``image``, output ``logits``."""
    require("onnx", "exporting to ONNX")  # torch's exporter serialises through it
    net.eval()
    net.deep_supervision = False
    device = next(net.parameters()).device
    example = torch.zeros((1, in_channels, *patch), device=device)
    axes = {0: "batch", **{i + 2: name for i, name in enumerate("zyx"[3 - len(patch):])}}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # chosen on purpose (see the module docstring); InstanceNorm has no running statistics, so exporting it
        # "with train=True" is exactly the eval graph; the traced shape checks hold for every patch the planner makes
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*instance_norm.*")
        torch.onnx.export(net, (example,), buffer, dynamo=False, opset_version=OPSET, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": axes, "logits": axes})
    return buffer.getvalue()


class RuntimeNetwork(nn.Module):
    """An exported network run by another runtime, called like the torch network: a (B, C, *patch) float32 tile
    batch in, (B, num_outputs, *patch) float32 logits out, on the tiles' device.

    Its only state is ``source_weights``, the digest of the torch weights it was exported from, so that what reads
    a network's state (the model identity recorded beside predictions) tells two runtime networks apart exactly as
    it tells their torch networks apart."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], num_outputs: int, engine: str,
                 source_weights: bytes):
        super().__init__()
        self.register_buffer("source_weights", torch.tensor(list(source_weights), dtype=torch.uint8))
        self._run = run
        self.num_outputs = num_outputs
        self.engine = engine
        self.deep_supervision = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._run(np.ascontiguousarray(x.detach().float().cpu().numpy()))
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)


def _onnxruntime(model: bytes, threads: int, device: torch.device) -> Callable[[np.ndarray], np.ndarray]:
    ort = require("onnxruntime", "--engine onnxruntime")
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise AutosegError("--engine onnxruntime --device cuda needs the CUDA build of ONNX Runtime "
                               "(pip install onnxruntime-gpu); or use --engine torch, or --device cpu")
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model, options, providers=providers)
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _openvino(model: bytes, threads: int, device: torch.device, in_channels: int,
              patch: Sequence[int]) -> Callable[[np.ndarray], np.ndarray]:
    ov = require("openvino", "--engine openvino")
    if device.type != "cpu":
        raise AutosegError(f"--engine openvino runs on the CPU here, not --device {device.type}; use --device cpu "
                           "or --engine torch")
    core = ov.Core()
    graph = core.read_model(model, ov.Tensor(np.empty(0, dtype=np.uint8)))
    graph.reshape([ov.Dimension(), in_channels, *patch])  # the sliding window only ever sends whole patches
    compiled = core.compile_model(graph, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
                                                 "PERFORMANCE_HINT": "LATENCY"})
    return lambda x: compiled(x)[0]


def runtime_network(engine: str, net: nn.Module, in_channels: int, patch: Sequence[int],
                    device: torch.device | str = "cpu", threads: int | None = None,
                    model: bytes | None = None) -> nn.Module:
    """``net`` itself for ``torch``; else ``net`` exported to ONNX (or ``model``, ONNX bytes of it) and loaded into
    ``engine`` with ``threads`` intra-op threads (default torch's own count, which follows OMP_NUM_THREADS)."""
    if engine not in ENGINES:
        raise AutosegError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
    if engine == "torch":
        return net
    device = torch.device(device)
    require(engine, f"--engine {engine}")  # before the export, so a missing runtime is named first
    threads = threads or torch.get_num_threads()
    model = model if model is not None else export_onnx(net, in_channels, patch)
    run = (_onnxruntime(model, threads, device) if engine == "onnxruntime"
           else _openvino(model, threads, device, in_channels, patch))
    return RuntimeNetwork(run, int(net.num_outputs), engine, weights_digest(net))


@torch.inference_mode()
def logit_difference(reference: nn.Module, candidate: nn.Module, in_channels: int, patch: Sequence[int],
                     device: torch.device | str = "cpu", batch: int = 2) -> tuple[float, float]:
    """(max |logit difference|, that relative to the largest |logit|) between two networks on one seeded random
    tile batch: how an exported graph is checked against the torch network it came from."""
    x = torch.randn((batch, in_channels, *patch), generator=torch.Generator().manual_seed(0)).to(device)
    reference.eval()
    reference.deep_supervision = False
    ref = reference(x).float()
    diff = float((candidate(x).float() - ref).abs().max())
    return diff, diff / max(float(ref.abs().max()), 1e-12)


def checked_runtime_network(engine: str, net: nn.Module, in_channels: int, patch: Sequence[int],
                            device: torch.device | str = "cpu", threads: int | None = None,
                            where: str = "the network", model: bytes | None = None) -> tuple[nn.Module, float]:
    """:func:`runtime_network`, refused unless its logits match ``net``'s (``MAX_RELATIVE_DIFF``); also returns the
    max |logit difference| (0 for torch)."""
    runtime = runtime_network(engine, net, in_channels, patch, device, threads, model)
    if runtime is net:
        return net, 0.0
    diff, relative = logit_difference(net, runtime, in_channels, patch, device)
    if not relative <= MAX_RELATIVE_DIFF:  # also catches NaN
        raise AutosegError(f"{where}: the {engine} logits differ from torch's by {diff:.3g} ({relative:.2%} of the "
                           f"largest logit, allowed {MAX_RELATIVE_DIFF:.1%}); this runtime build mis-runs the graph: "
                           "use --engine torch")
    return runtime, diff


def installed_runtimes() -> list[str]:
    """The runtime engines whose packages (and the ONNX exporter's) are importable here."""
    if importlib.util.find_spec("onnx") is None:
        return []
    return [e for e in ENGINES[1:] if importlib.util.find_spec(e) is not None]


def decide_engine(seconds: Mapping[str, float], min_gain: float = MIN_GAIN) -> tuple[str, str]:
    """(engine, reason) from measured seconds per tile batch (pure): the fastest, but a runtime only where it beats
    torch by ``min_gain`` (below that, timing noise on a shared machine could pick it)."""
    best = min(seconds, key=lambda e: seconds[e])
    base = seconds["torch"]
    if best == "torch":
        return "torch", f"torch {base:.3f} s per tile batch, fastest measured"
    gain = base / seconds[best]
    if gain < min_gain:
        return "torch", f"{best} only {gain:.2f}x faster than torch ({base:.3f} s per tile batch; needs {min_gain}x)"
    return best, f"{best} {seconds[best]:.3f} s per tile batch, {gain:.2f}x faster than torch ({base:.3f} s)"


@torch.inference_mode()
def time_engines(net: nn.Module, runtimes: Mapping[str, nn.Module], in_channels: int, patch: Sequence[int],
                 device: torch.device, precision: Precision, tile_batch: int = 2, repeats: int = 2,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Seconds per forward pass of one seeded random tile batch for torch (in ``precision``) and each runtime:
    a warm-up each, then ``repeats`` interleaved rounds, the fastest round counting (as :func:`autoseg.precision.probe`:
    a busy neighbour only adds time, and interleaving spreads a burst over every engine)."""
    x = torch.randn((tile_batch, in_channels, *patch), generator=torch.Generator().manual_seed(0)).to(device)
    if precision.channels_last and x.ndim == 5:
        x = x.contiguous(memory_format=torch.channels_last_3d)

    def torch_forward() -> None:
        with precision.autocast(device):
            net(x)

    runs = {"torch": torch_forward, **{e: (lambda r=r: r(x)) for e, r in runtimes.items()}}
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {e: [] for e in runs}
    for _ in range(max(1, repeats)):
        for engine, run in runs.items():
            t = clock()
            run()
            times[engine].append(clock() - t)
    return {e: round(min(ts), 4) for e, ts in times.items()}


def engine_networks(engine: str, models: Sequence[nn.Module], sources: Sequence[Path], patch: Sequence[int],
                    in_channels: int, device: torch.device,
                    precision: Precision) -> tuple[list[nn.Module], Precision, str]:
    """Each fold's network (``models``, loaded from ``sources``) in the engine to run, the precision the sliding
    window then uses, and a line saying which engine and why. ``auto``: the fastest of torch (in its measured
    ``precision``) and every installed runtime on the CPU (:func:`time_engines` on the first fold, each runtime
    checked against torch first; a runtime that mis-runs the graph is left out and named)."""
    if engine == "torch":
        return list(models), precision, "torch (as asked)"
    first: nn.Module | None = None
    reason = f"{engine} (as asked)"
    if engine == "auto":
        if device.type != "cpu" or precision.mode != "fp32":
            return list(models), precision, f"torch (auto: {precision.mode} on {device.type})"
        runtimes, notes = {}, []
        for candidate in installed_runtimes():
            try:
                runtimes[candidate] = checked_runtime_network(candidate, models[0], in_channels, patch, device,
                                                              where=str(sources[0]))[0]
            except AutosegError as e:
                notes.append(str(e))
        if not runtimes:
            return list(models), precision, "torch (auto: no runtime installed; pip install 'autoseg[onnx]')"
        seconds = time_engines(models[0], runtimes, in_channels, patch, device, precision)
        engine, why = decide_engine(seconds)
        reason = f"{engine} (auto: {why}; measured {seconds}{'; ' if notes else ''}{'; '.join(notes)})"
        if engine == "torch":
            return list(models), precision, reason
        first = runtimes[engine]
    out, diffs = [], []
    for i, (net, source) in enumerate(zip(models, sources)):
        if i == 0 and first is not None:
            out.append(first)
            continue
        runtime, diff = checked_runtime_network(engine, net, in_channels, patch, device, where=str(source))
        out.append(runtime)
        diffs.append(diff)
    checked = f", max |logit - torch| {max(diffs):.2g} on a random tile batch" if diffs else ""
    return out, Precision(reason=f"{engine} runs the exported float32 graph"), reason + checked
