"""The precision probe: a valid mode on every kind of device, bf16 only where it is measured faster and sound."""

import itertools

import pytest
import torch

from autoseg.errors import AutosegError
from autoseg.precision import MIN_GAIN, Precision, candidates, decide, probe

CPU = torch.device("cpu")


def simulated(step_s: dict[str, float], error: dict[str, float] | None = None):
    """A device where one step of each mode takes ``step_s[mode]`` seconds (channels-last 10% faster) and
    returns the float32 result perturbed by ``error[mode]`` (relative)."""
    clock_now = itertools.count()
    state = {"t": 0.0}
    ref = torch.linspace(1, 2, 100)

    def clock():
        next(clock_now)
        return state["t"]

    def run(mode, channels_last):
        state["t"] += step_s[mode] * (0.9 if channels_last else 1.0)
        return ref * (1 + (error or {}).get(mode, 0.0))

    return run, clock


def test_amx_like_cpu_picks_bf16():
    run, clock = simulated({"fp32": 0.81, "bf16": 0.30})
    p = probe(run, CPU, 3, hardware=lambda d: "bf16", clock=clock)
    assert (p.mode, p.channels_last) == ("bf16", True)
    assert p.amp_dtype is torch.bfloat16
    assert p.seconds["bf16+channels_last"] == pytest.approx(0.27)
    assert "faster than fp32" in p.reason


def test_cpu_where_bf16_is_emulated_keeps_fp32_without_probing_it():
    calls = []
    run, clock = simulated({"fp32": 0.8, "bf16": 80.0})

    def spy(mode, cl):
        calls.append(mode)
        return run(mode, cl)

    p = probe(spy, CPU, 3, hardware=lambda d: None, clock=clock)
    assert p.mode == "fp32" and p.amp_dtype is None
    assert "bf16" not in calls  # a 100x slower path is never even timed


def test_bf16_reported_but_slower_falls_back_to_fp32():
    run, clock = simulated({"fp32": 0.8, "bf16": 80.0})
    p = probe(run, CPU, 2, hardware=lambda d: "bf16", clock=clock)
    assert p.mode == "fp32" and not p.channels_last  # 2D networks have no channels-last candidate
    assert set(p.seconds) == {"fp32", "bf16"}


def test_load_arriving_halfway_through_the_probe_does_not_decide():
    """A neighbour's job starts halfway through the probe and makes every later step 5x slower. Timed back to back
    (every float32 step first, then every bf16 one) bf16 would look slower; interleaved rounds each give every
    candidate a step before the load arrived."""
    base, state, calls = {"fp32": 0.8, "bf16": 0.3}, {"t": 0.0}, []
    ref = torch.linspace(1, 2, 100)

    def run(mode, channels_last):
        calls.append(mode)
        spike = 5.0 if len(calls) > 7 else 1.0
        state["t"] += base[mode] * spike * (0.9 if channels_last else 1.0)
        return ref

    p = probe(run, CPU, 3, repeats=2, hardware=lambda d: "bf16", clock=lambda: state["t"])
    assert p.mode == "bf16", p.reason
    assert calls[4:8] == ["fp32", "fp32", "bf16", "bf16"]  # a round times each candidate once, in turn
    assert p.seconds["fp32"] == pytest.approx(0.8) and p.seconds["bf16"] == pytest.approx(0.3)


def test_marginal_gain_is_not_enough():
    run, clock = simulated({"fp32": 1.0, "bf16": 1.0 / (MIN_GAIN - 0.05)})
    assert probe(run, CPU, 2, hardware=lambda d: "bf16", clock=clock).mode == "fp32"


def test_numerically_unsound_mode_is_refused_however_fast():
    run, clock = simulated({"fp32": 1.0, "bf16": 0.1}, error={"bf16": 0.5})
    p = probe(run, CPU, 2, hardware=lambda d: "bf16", clock=clock)
    assert p.mode == "fp32"


def test_nan_result_is_unsound():
    seconds = {"fp32": 1.0, "bf16": 0.2}
    assert decide(seconds, {"fp32": True, "bf16": False})[0] == "fp32"
    with pytest.raises(AutosegError, match="--precision fp32"):
        decide(seconds, {"fp32": False, "bf16": False})


def test_forced_modes_and_bad_values():
    run, clock = simulated({"fp32": 0.8, "bf16": 80.0})
    assert probe(run, CPU, 3, requested="bf16", hardware=lambda d: None, clock=clock).mode == "bf16"
    assert probe(run, CPU, 3, requested="fp32", hardware=lambda d: "bf16", clock=clock).mode == "fp32"
    with pytest.raises(AutosegError, match="fp16 needs a CUDA"):
        candidates(CPU, 3, "fp16", "bf16")
    with pytest.raises(AutosegError, match="--precision 'fp8'"):
        candidates(CPU, 3, "fp8", None)


def test_cuda_candidates_without_bf16_use_fp16():
    cands = candidates(torch.device("cuda"), 3, "auto", "fp16")
    assert {m for m, _ in cands} == {"fp32", "fp16"}


def test_round_trip_and_validation_of_saved_choice():
    p = Precision("bf16", True, {"bf16+channels_last": 0.3}, "why")
    assert Precision.from_json(p.to_json()) == p
    assert p.step_s == 0.3
    with pytest.raises(AutosegError, match="not valid"):
        Precision.from_json({"mode": "int4", "channels_last": False})


def test_real_probe_on_this_cpu_returns_a_working_mode():
    net = torch.nn.Conv3d(1, 2, 3, padding=1)
    x = torch.randn(1, 1, 8, 8, 8)

    def run(mode, cl):
        p = Precision(mode, cl)
        xx = x.contiguous(memory_format=torch.channels_last_3d) if cl else x
        with torch.no_grad(), p.autocast(CPU):
            return net(xx).float()

    p = probe(run, CPU, 3, repeats=1)
    assert p.mode in ("fp32", "bf16") and set(p.seconds) >= {"fp32", "fp32+channels_last"}
