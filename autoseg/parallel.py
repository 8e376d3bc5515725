"""One way to run a function over many cases: in worker processes, in input order, with a progress bar.

Failures are returned per item instead of aborting the whole run, so a command can finish the valid cases and
then report every bad one by name. Workers are started with ``spawn`` so a parent that already loaded torch or
OpenMP threads cannot deadlock them, and each one exits when its parent dies. Given a ``cluster`` (any
:class:`CaseMapper`, e.g. :class:`autoseg.cluster.Cluster`), the same items run there instead, with the same results.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Protocol, Sequence, TypeVar

from tqdm import tqdm

from .errors import AutosegError

# Worker processes a command starts by default: each holds one case in memory.
DEFAULT_WORKERS = max(1, min(4, os.cpu_count() or 1))
PARENT_POLL_S = 0.5  # how soon an orphaned worker notices its parent is gone

T = TypeVar("T")
R = TypeVar("R")


class CaseMapper(Protocol):
    """Something that runs ``fn`` over items elsewhere (another engine) with :func:`map_cases`'s results."""

    def map(self, fn: Callable[[T], R], items: Sequence[T], desc: str = "", progress: bool = True,
            initializer: Callable[[], None] | None = None) -> list[tuple[R | None, str | None]]: ...


def describe(item: object) -> str:
    """A short name for an item in messages: ``case <id>`` for a Case (or a job tuple starting with one), else
    ``str(item)`` cut to 200 characters (a preprocessing job also carries the whole plan)."""
    for x in (item, item[0] if isinstance(item, tuple) and item else None):
        case_id = getattr(x, "case_id", None)
        if case_id is not None:
            return f"case {case_id}"
    text = str(item)
    return text if len(text) <= 200 else text[:197] + "..."


def _exit_with_parent(parent: int, initializer: Callable[[], None] | None) -> None:
    """Worker start-up: a daemon thread ends this process once its parent is gone (a parent killed with SIGKILL
    cannot shut its pool down, and an orphaned worker would otherwise wait for work forever), then the caller's
    ``initializer``."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="autoseg-parent-watch", daemon=True).start()
    if initializer is not None:
        initializer()


def guarded(fn: Callable[[T], R], item: T) -> tuple[R | None, str | None]:
    """``(fn(item), None)``, or ``(None, message)`` for a user-facing error or memory exhaustion; anything else is
    a bug and propagates (the error semantics every way of mapping cases shares)."""
    try:
        return fn(item), None
    except AutosegError as e:
        return None, str(e)
    except MemoryError:
        return None, (f"{describe(item)}: out of memory while processing this case; lower -np to give each worker "
                      "more RAM")


def map_cases(
    fn: Callable[[T], R], items: Iterable[T], num_workers: int = 1, desc: str = "", progress: bool = True,
    initializer: Callable[[], None] | None = None, cluster: CaseMapper | None = None,
) -> list[tuple[R | None, str | None]]:
    """``[(result, None) | (None, error message)]`` for each item, in order. ``fn`` (and ``initializer``, run once
    in each worker process) must be module-level functions. With ``cluster`` the items run there and
    ``num_workers`` is ignored (the cluster's own resources decide how many run at once).

    Only user-facing errors (``AutosegError``) and memory exhaustion are caught; anything else is a bug and
    propagates with its traceback. A worker process that dies outright (the OOM killer) raises an ``AutosegError``
    naming the items that did not finish.
    """
    items = list(items)
    if cluster is not None:
        return cluster.map(fn, items, desc=desc, progress=progress, initializer=initializer)
    bar = dict(total=len(items), desc=desc, unit="case", disable=not progress, leave=False)
    if num_workers <= 1 or len(items) <= 1:
        return [guarded(fn, it) for it in tqdm(items, **bar)]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(num_workers, len(items)), mp_context=ctx, initializer=_exit_with_parent,
                             initargs=(os.getpid(), initializer)) as pool:
        futures = [pool.submit(guarded, fn, it) for it in items]
        try:
            return [f.result() for f in tqdm(futures, **bar)]
        except BrokenProcessPool:  # a worker died without a Python exception: the OOM killer, a crash, os._exit
            lost = [describe(it) for it, f in zip(items, futures) if not f.done() or f.exception() is not None]
            raise AutosegError(
                f"a worker process died abruptly (killed by the system, most likely out of memory) while running "
                f"{desc or 'the job'}; {len(lost)} of {len(items)} item(s) did not finish: {', '.join(lost)}. "
                f"Rerun with fewer worker processes (lower -np, e.g. -np 1) so each has more RAM"
            ) from None
