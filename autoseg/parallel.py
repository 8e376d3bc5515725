"""One way to run a function over many cases: in worker processes, in input order, with a progress bar.

Failures are returned per item instead of aborting the whole run, so a command can finish the valid cases and
then report every bad one by name. Workers are started with ``spawn`` so a parent that already loaded torch or
OpenMP threads cannot deadlock them.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable, TypeVar

from tqdm import tqdm

from .errors import AutosegError

T = TypeVar("T")
R = TypeVar("R")


def _guarded(args: tuple[Callable[[T], R], T]) -> tuple[R | None, str | None]:
    fn, item = args
    try:
        return fn(item), None
    except AutosegError as e:
        return None, str(e)
    except MemoryError:
        return None, f"{item}: out of memory while processing this case; lower -np to give each worker more RAM"


def map_cases(
    fn: Callable[[T], R], items: Iterable[T], num_workers: int = 1, desc: str = "", progress: bool = True
) -> list[tuple[R | None, str | None]]:
    """``[(result, None) | (None, error message)]`` for each item, in order. ``fn`` must be a module-level function.

    Only user-facing errors (``AutosegError``) and memory exhaustion are caught; anything else is a bug and
    propagates with its traceback.
    """
    items = list(items)
    bar = dict(total=len(items), desc=desc, unit="case", disable=not progress, leave=False)
    jobs = [(fn, it) for it in items]
    if num_workers <= 1 or len(items) <= 1:
        return [_guarded(j) for j in tqdm(jobs, **bar)]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(num_workers, len(items)), mp_context=ctx) as pool:
        return list(tqdm(pool.map(_guarded, jobs), **bar))
