"""Seconds per case and Dice for each inference engine on one trained model, same settings (`predict --engine`).

Every engine runs the same sliding window (mirroring on, step 0.5 unless --fast) of the same fold's weights over the
same test cases; Dice per label is against the cases' reference labels and the change to torch is reported. Besides
the float32 engines it measures reduced precision where a runtime supports it:
- int8: the ONNX graph quantised statically (ONNX Runtime's QDQ, per-channel weights, activations calibrated on
  tiles of the training images, never the test cases), run by ONNX Runtime and by OpenVINO (which executes QDQ
  graphs in int8 on VNNI CPUs);
- bf16: torch autocast and OpenVINO's bf16 precision hint, only on CPUs with bf16 units (elsewhere both emulate
  it, ~100x slower for torch), so skipped here with the reason.
A variant is acceptable only if its mean foreground Dice is within 0.005 of torch's. Engines are loaded once; the
cases rotate the engine order so a load burst on a shared machine hits every engine alike; s/case is the median.

    python benchmarks/bench_engines.py -m AUTOSEG_RESULTS/Dataset777_X/2d --images RAW/imagesTs --labels RAW/labelsTs \
        --calibration RAW/imagesTr
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402

from autoseg.checkpoint import load_weights  # noqa: E402
from autoseg.inference.engines import ENGINES, export_onnx, logit_difference, runtime_network  # noqa: E402
from autoseg.inference.predictor import Predictor  # noqa: E402
from autoseg.io.dataset import load_dataset_json  # noqa: E402
from autoseg.io.images import read_image  # noqa: E402
from autoseg.labels import LabelSpec, labels_from_probabilities  # noqa: E402
from autoseg.layout import checkpoint_file, fold_dir  # noqa: E402
from autoseg.masks import dice_per_label  # noqa: E402
from autoseg.network import build_network  # noqa: E402
from autoseg.precision import hardware_low_precision  # noqa: E402

MAX_DICE_CHANGE = 0.005


def _calibration_tiles(torch_predictor: Predictor, images: list[Path], per_case: int, seed: int = 0):
    """Random patch-sized tiles (1, C, *patch) of the preprocessed calibration images."""
    rng = np.random.default_rng(seed)
    patch = torch_predictor.config["patch_size"]
    for path in images:
        data, geo = read_image(path)
        pre, _ = torch_predictor.preprocess(data[None].astype(np.float32), geo)
        full = (1, *patch) if len(patch) == 2 else tuple(patch)
        pad = [(0, 0)] + [(0, max(0, p - s)) for p, s in zip(full, pre.shape[1:])]
        pre = np.pad(pre, pad)
        for _ in range(per_case):
            start = [int(rng.integers(0, s - p + 1)) for s, p in zip(pre.shape[1:], full)]
            tile = pre[(slice(None),) + tuple(slice(a, a + p) for a, p in zip(start, full))]
            yield np.ascontiguousarray((tile[:, 0] if len(patch) == 2 else tile)[None], dtype=np.float32)


def _quantize_int8(model: bytes, tiles: list[np.ndarray]) -> bytes:
    """Static QDQ int8 quantisation of an ONNX graph with ONNX Runtime's tools (per-channel weights)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(tiles)

        def get_next(self):
            tile = next(self.items, None)
            return None if tile is None else {"image": tile}

    with tempfile.TemporaryDirectory() as d:
        src, pre, out = Path(d) / "f32.onnx", Path(d) / "pre.onnx", Path(d) / "int8.onnx"
        src.write_bytes(model)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        return out.read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", required=True, type=Path, help="a trained configuration folder")
    parser.add_argument("-f", "--fold", default="all", help="fold to use (default all)")
    parser.add_argument("--images", required=True, type=Path, help="test images (CASE_0000.nii.gz)")
    parser.add_argument("--labels", required=True, type=Path, help="their reference labels (CASE.nii.gz)")
    parser.add_argument("--calibration", type=Path, help="training images for int8 calibration (default: no int8)")
    parser.add_argument("--cases", type=int, default=4, help="test cases to predict (default 4)")
    parser.add_argument("--fast", action="store_true", help="no mirroring, step 0.75 (predict --fast)")
    args = parser.parse_args()
    mirror, step = (False, 0.75) if args.fast else (True, 0.5)
    cpu = torch.device("cpu")

    variants: dict[str, Predictor] = {}
    load_s: dict[str, float] = {}
    for engine in ENGINES:
        if engine != "torch" and importlib.util.find_spec(engine) is None:
            print(f"{engine}: not installed, skipped")
            continue
        t0 = time.perf_counter()
        variants[engine] = Predictor.from_trained(args.model, [args.fold], device="cpu", mirror=mirror, step=step,
                                                  engine=engine)
        load_s[engine] = time.perf_counter() - t0
    base = variants["torch"]
    meta = load_dataset_json(args.model)
    n_out = LabelSpec.from_meta(meta).layout()[0]
    in_channels, patch = len(meta["channel_names"]), base.config["patch_size"]
    net = build_network(base.config, in_channels, n_out)
    load_weights(checkpoint_file(fold_dir(args.model, args.fold), "final"), net)
    net.eval().deep_supervision = False
    skipped = {}
    if hardware_low_precision(cpu) != "bf16":
        skipped["bf16"] = "this CPU has no bf16 units (no AVX512-BF16/AMX): torch and OpenVINO would emulate it"
    else:
        variants["torch bf16"] = Predictor.from_trained(args.model, [args.fold], device="cpu", mirror=mirror,
                                                        step=step, precision="bf16")
    if args.calibration and importlib.util.find_spec("onnxruntime"):
        t0 = time.perf_counter()
        calibration = sorted(args.calibration.glob("*_0000.nii.gz"))[:4]
        int8 = _quantize_int8(export_onnx(net, in_channels, patch), list(_calibration_tiles(base, calibration, 8)))
        print(f"int8 quantisation: {time.perf_counter() - t0:.1f} s on {len(calibration)} calibration images")
        for engine in ("onnxruntime", "openvino"):
            if engine in variants:
                runtime = runtime_network(engine, net, in_channels, patch, cpu, model=int8)
                diff, rel = logit_difference(net, runtime, in_channels, patch)
                print(f"{engine} int8: max |logit - torch| {diff:.3g} ({rel:.2%} of the largest)")
                variants[f"{engine} int8"] = Predictor(base.plans, base.meta, base.configuration, [runtime], cpu,
                                                       mirror, step)

    cases = sorted(args.images.glob("*_0000.nii.gz"))[: args.cases]
    names = list(variants)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    dice: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    labels = [v for k, v in meta["labels"].items() if k != "background" and isinstance(v, int)]
    for i, path in enumerate(cases):
        data, geo = read_image(path)
        ref, _ = read_image(args.labels / path.name.replace("_0000", ""))
        for name in names[i % len(names):] + names[: i % len(names)]:
            t0 = time.perf_counter()
            probs = variants[name].predict_array(data[None].astype(np.float32), geo)
            seconds[name].append(time.perf_counter() - t0)
            seg = labels_from_probabilities(probs, variants[name].regions_class_order)
            dice[name].append(dice_per_label(seg, ref, labels))
            print(f"{path.name} {name}: {seconds[name][-1]:.1f} s, Dice {dice[name][-1]}", flush=True)

    def mean_dice(name: str) -> float:
        return float(np.mean([np.mean(list(d.values())) for d in dice[name]]))

    rows = []
    for name in names:
        change = mean_dice(name) - mean_dice("torch")
        row = {"engine": name, "configuration": base.configuration, "patch": "x".join(map(str, patch)),
               "cases": len(cases), "mirroring": mirror, "s_per_case": round(statistics.median(seconds[name]), 2),
               "load_s": round(load_s.get(name, 0.0), 1),
               "speedup_vs_torch": round(statistics.median(seconds["torch"]) / statistics.median(seconds[name]), 2),
               "mean_fg_dice": round(mean_dice(name), 4), "dice_change": round(change, 4),
               "accepted": abs(change) <= MAX_DICE_CHANGE, "threads": torch.get_num_threads()}
        for v in labels:
            row[f"dice_{v}"] = round(float(np.mean([d[str(v)] for d in dice[name]])), 4)
        rows.append(row)
    for name, reason in skipped.items():
        rows.append({"engine": name, "configuration": base.configuration, "accepted": False, "skipped": reason})
    report(f"engines_{base.configuration}", rows,
           ["engine", "configuration", "cases", "mirroring", "s_per_case", "speedup_vs_torch", "load_s",
            "mean_fg_dice", "dice_change", "accepted", *[f"dice_{v}" for v in labels], "skipped"])


if __name__ == "__main__":
    main()
