"""Shared benchmark helpers: run a command while sampling the peak RSS of its whole process tree, print a table,
write JSON. Peak RSS is the largest sum over the process and all its descendants seen at any sample (every 50 ms),
which is what a user's machine has to hold, workers included."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

OUT = Path(__file__).resolve().parent / "out"


def _tree_rss_bytes(root: int) -> int:
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            pid, ppid, pages = int(entry.name), int(fields[1]), int(fields[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(pid)
        rss[pid] = pages * os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def run_measured(cmd: Sequence[str], env: dict | None = None) -> dict:
    """Run ``cmd``; return wall seconds, peak tree RSS in GB and the exit code. Raises if the command fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss_bytes(proc.pid))
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    output, _ = proc.communicate()
    stop.set()
    t.join()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_gb": round(peak / 1e9, 3), "output": output}


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux): benchmark figures differ between CPU kinds."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    import torch

    from autoseg.precision import hardware_low_precision

    return {
        "cpu": cpu_model(),
        "cpu_bf16": hardware_low_precision(torch.device("cpu")) == "bf16",
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def report(name: str, rows: list[dict], columns: Sequence[str]) -> Path:
    """Print ``rows`` as a table and write them, with the machine description, to ``benchmarks/out/<name>.json``."""
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))
    OUT.mkdir(exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")
    return path


def autoseg(args: Sequence[str], env: dict, log: Path) -> None:
    """Run ``autoseg ARGS`` with this Python, its output appended to ``log``; a failure stops the benchmark."""
    with open(log, "a") as f:
        f.write(f"\n$ autoseg {' '.join(args)}\n")
        f.flush()
        proc = subprocess.run([sys.executable, "-m", "autoseg", *args], env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"autoseg {' '.join(args)} failed (exit {proc.returncode}); see {log}")


def best_of(fn: Callable[[], object], n: int = 3) -> float:
    """The fastest of ``n`` timed calls of ``fn``, in seconds (load from other jobs only adds time)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
