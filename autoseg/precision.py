"""Numeric precision and memory format, chosen per device and network by timing real steps.

Why measure instead of asking the CPU's name: bfloat16 autocast makes the same training step 2.7-3.6x faster on
CPUs with bf16 matrix instructions (AVX512-BF16, AMX) and about 100x slower on CPUs without them, and the gain
depends on the network too (a small 2D forward pass can be slower in bf16). So a candidate mode is only tried where
the hardware reports bf16 support (never probing a 100x slower path), then every candidate runs a few real steps of
the planned network and the fastest numerically sound one wins, if it beats float32 by ``MIN_GAIN``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from .errors import AutosegError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# A faster mode must beat float32 by this factor: below it, timing noise on a shared machine could pick it.
MIN_GAIN = 1.15
# Relative L2 difference to the float32 result (loss or logits) above which a mode is numerically unsound.
SOUND_RTOL = 0.05


@dataclass(frozen=True)
class Precision:
    """The chosen mode (``fp32``, ``bf16`` or ``fp16``), memory format, what was measured and why it won."""

    mode: str = "fp32"
    channels_last: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    reason: str = "float32 (not measured)"

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.mode]

    @property
    def step_s(self) -> float | None:
        """Measured seconds per step of the chosen candidate (None when nothing was measured)."""
        return self.seconds.get(candidate_name(self.mode, self.channels_last))

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.amp_dtype)

    def to_json(self) -> dict:
        return {"mode": self.mode, "channels_last": self.channels_last, "seconds": dict(self.seconds),
                "reason": self.reason}

    @classmethod
    def from_json(cls, d: Mapping) -> "Precision":
        mode, cl = d.get("mode"), d.get("channels_last")
        if mode not in PRECISIONS[1:] or not isinstance(cl, bool):
            raise AutosegError(f"saved precision {dict(d)!r} is not valid (mode one of {PRECISIONS[1:]}, "
                               "channels_last true/false)")
        seconds = {str(k): float(v) for k, v in dict(d.get("seconds", {})).items()}
        return cls(mode, cl, seconds, str(d.get("reason", "")))


def candidate_name(mode: str, channels_last: bool) -> str:
    return mode + ("+channels_last" if channels_last else "")


def hardware_low_precision(device: torch.device) -> str | None:
    """The reduced precision this device runs in hardware (``bf16``, ``fp16``) or None.

    CPU: bf16 only where the CPU reports AVX512-BF16 or AMX tiles (torch's own capability checks); elsewhere
    bf16 autocast falls back to slow emulation, so it is not even tried. CUDA: bf16 where supported, else fp16.
    """
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        checks = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return "bf16" if any(c is not None and c() for c in checks) else None
    return None


def candidates(device: torch.device, dims: int, requested: str, low: str | None) -> list[tuple[str, bool]]:
    """(mode, channels_last) pairs to time. ``low`` is :func:`hardware_low_precision`'s answer."""
    if requested not in PRECISIONS:
        raise AutosegError(f"--precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    if requested == "fp16" and device.type != "cuda":
        raise AutosegError("--precision fp16 needs a CUDA device (float16 on a CPU is emulated and slow); "
                           "use --precision auto, bf16 or fp32")
    modes = ["fp32"] if requested == "fp32" else [requested] if requested != "auto" else ["fp32"] + ([low] if low else [])
    formats = [False, True] if dims == 3 else [False]
    return [(m, cl) for m in modes for cl in formats]


def decide(seconds: Mapping[str, float], sound: Mapping[str, bool], requested: str = "auto") -> tuple[str, bool, str]:
    """Pick (mode, channels_last, reason) from measured seconds per candidate and their soundness (pure).

    The fastest sound candidate wins; a reduced-precision one only if it beats the fastest float32 candidate by
    ``MIN_GAIN`` (``requested`` other than ``auto`` forces the mode, still choosing the faster memory format).
    """
    parsed = {}
    for name, s in seconds.items():
        mode, _, fmt = name.partition("+")
        parsed[name] = (mode, fmt == "channels_last", float(s))
    pool = {n: v for n, v in parsed.items() if sound.get(n, False)}
    if not pool:
        raise AutosegError(f"no numerically sound precision among {sorted(seconds)}; try --precision fp32")
    best = min(pool, key=lambda n: pool[n][2])
    mode, cl, s = pool[best]
    fp32 = {n: v for n, v in pool.items() if v[0] == "fp32"}
    if requested == "auto" and mode != "fp32" and fp32:
        base = min(fp32, key=lambda n: fp32[n][2])
        gain = fp32[base][2] / s
        if gain < MIN_GAIN:
            m, c, t = fp32[base]
            return m, c, f"{base} {t:.3f} s/step; {best} only {gain:.2f}x faster (needs {MIN_GAIN}x)"
        return mode, cl, f"{best} {s:.3f} s/step, {gain:.2f}x faster than {base} ({fp32[base][2]:.3f} s)"
    unsound = sorted(n for n in seconds if not sound.get(n, False))
    extra = f"; numerically unsound: {', '.join(unsound)}" if unsound else ""
    return mode, cl, f"{best} {s:.3f} s/step (fastest measured{', as asked' if requested != 'auto' else ''}){extra}"


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().float(), ref.detach().float()
    if not torch.isfinite(a).all():
        return float("inf")
    return float(torch.linalg.vector_norm(a - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-12))


def probe(
    run: Callable[[str, bool], torch.Tensor],
    device: torch.device,
    dims: int,
    requested: str = "auto",
    repeats: int = 2,
    hardware: Callable[[torch.device], str | None] = hardware_low_precision,
    clock: Callable[[], float] = time.perf_counter,
) -> Precision:
    """Time ``run(mode, channels_last)`` (one real step, returning its loss or logits) per candidate and decide.

    Each candidate runs once untimed (warm-up; its result is compared with float32's for soundness), then
    ``repeats`` rounds time every candidate once, interleaved, and each candidate's fastest round counts: a busy
    neighbour only ever adds time, and interleaving spreads a burst of it over all candidates instead of one
    (timed back to back, a spike during one candidate's repeats once made bf16 look 1.6x slower than float32).
    ``hardware`` and ``clock`` exist so tests can simulate devices.
    """
    cands = candidates(device, dims, requested, hardware(device))
    if len(cands) == 1 and requested != "auto":
        m, cl = cands[0]
        return Precision(m, cl, {}, f"{candidate_name(m, cl)} as asked (not measured)")
    sound, reference = {}, None
    for mode, cl in cands:
        out = run(mode, cl)
        if mode == "fp32" and reference is None:
            reference = out
        err = 0.0 if reference is None or mode == "fp32" else relative_error(out, reference)
        sound[candidate_name(mode, cl)] = err <= SOUND_RTOL and bool(torch.isfinite(out.detach().float()).all())
    times: dict[str, list[float]] = {candidate_name(m, cl): [] for m, cl in cands}
    for _ in range(max(1, repeats)):
        for mode, cl in cands:
            t = clock()
            run(mode, cl)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[candidate_name(mode, cl)].append(clock() - t)
    seconds = {name: round(min(ts), 4) for name, ts in times.items()}
    mode, cl, reason = decide(seconds, sound, requested)
    return Precision(mode, cl, seconds, reason)
