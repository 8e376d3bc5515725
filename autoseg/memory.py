"""Memory estimates before large allocations: a case that cannot fit is refused with a message, not swapped to death.

A test image with a hostile or mistaken header (100 mm spacing resampled to 1 mm, a size field of 10^5) would
otherwise grow the process past the machine's RAM with no message, and the good cases after it would never run.
Callers estimate what an allocation needs and call :func:`require_memory` first; the refusal is an
:class:`AutosegError` for that case only, so commands that handle many cases go on with the others.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import AutosegError

USABLE_FRACTION = 0.8  # leave room for the interpreter, torch and the page cache


def available_bytes() -> int:
    """Memory this process may still take: the kernel's MemAvailable, capped by a cgroup (container) limit."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:  # not Linux: physical memory as the bound
        avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 2**62
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(avail, 0)


def require_memory(needed: int, what: str, fix: str) -> None:
    """Raise an :class:`AutosegError` naming ``what``, the estimate and ``fix`` when ``needed`` bytes exceed the
    usable share of :func:`available_bytes`."""
    usable = int(available_bytes() * USABLE_FRACTION)
    if needed > usable:
        raise AutosegError(f"{what} would need about {needed / 2**30:.1f} GiB of memory, more than the "
                           f"{usable / 2**30:.1f} GiB available; {fix}")
