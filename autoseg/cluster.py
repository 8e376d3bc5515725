"""Cases across processes and machines on Ray: the per-case functions and error semantics of
:func:`autoseg.parallel.map_cases`, scheduled by an existing engine instead of a home-made one.

:func:`open_cluster` starts an embedded single-machine Ray (``local``: no dashboard, a small object store, since only
case descriptions and short results travel through it; every array goes through files) or joins a running cluster
(``ray start --head`` on one node, ``ray start --address HEAD:6379`` on the others). Two ways to map:

- :meth:`Cluster.map`: one Ray task per item (1 CPU each), for work without state, such as preprocessing a case;
- :meth:`Cluster.map_with`: a pool of actors that each run ``setup()`` once (load the model) and then take items one
  at a time as they come free, holding a GPU each where the cluster has GPUs.

A worker process that dies (the OOM killer, a lost node, a SIGKILL) is restarted by Ray and its item run again, up to
``RETRIES`` more times; an item that kills its worker every time is reported by name like any bad case. Outputs are
written by the workers with :mod:`autoseg.atomic`, so a killed worker leaves at most a temporary, never a partial
output. Ray moves functions and items between the processes of the cluster with its own serialiser, as
``multiprocessing`` does between the processes of one machine; nothing read from disk is unpickled.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import socket
from collections import deque
from types import ModuleType
from typing import Any, Callable, Iterator, Sequence, TypeVar

from tqdm import tqdm

from .errors import AutosegError
from .parallel import describe, guarded

LOCAL = "local"  # start an embedded single-machine Ray for this run
AUTO = "auto"  # join the Ray head running on this machine, if any, else run without Ray
RETRIES = 2  # further attempts at an item whose worker process died
LOCAL_OBJECT_STORE_BYTES = 100 * 1024**2  # only case descriptions and short results go through it
INSTALL_HINT = "install it with: pip install 'autoseg[cluster]'"
CONNECT_TIMEOUT_S = 5.0  # Ray itself retries an unreachable head for minutes

S = TypeVar("S")
T = TypeVar("T")
R = TypeVar("R")
Outcome = tuple[Any, str | None]


def _run_task(fn: Callable[[T], R], item: T, initializer: Callable[[], None] | None) -> Outcome:
    """The body of a Ray task: the caller's per-process ``initializer`` (cheap and idempotent), then ``fn``."""
    if initializer is not None:
        initializer()
    return guarded(fn, item)


class _CaseWorker:
    """The body of a Ray actor: ``setup()`` once when its process starts (again after a restart), then items."""

    def __init__(self, setup: Callable[[], S], fn: Callable[[S, T], R]):
        self._fn, self._error = fn, None
        try:
            self._state = setup()
        except AutosegError as e:  # reported once by the driver instead of once per item
            self._state, self._error = None, str(e)

    def ready(self) -> str | None:
        """None when the setup worked, else its error message."""
        return self._error

    def run(self, item: T) -> Outcome:
        return guarded(functools.partial(self._fn, self._state), item)


class Cluster:
    """A Ray runtime this process is connected to (see :func:`open_cluster`); implements
    :class:`autoseg.parallel.CaseMapper`."""

    def __init__(self, ray: ModuleType, where: str):
        self._ray, self.where = ray, where

    def resources(self) -> tuple[int, int, list[int]]:
        """(CPUs, GPUs, CPUs of each alive node that has any) of the whole cluster."""
        total = self._ray.cluster_resources()
        nodes = [int(n["Resources"].get("CPU", 0)) for n in self._ray.nodes() if n.get("Alive")]
        return int(total.get("CPU", 0)), int(total.get("GPU", 0)), [c for c in nodes if c > 0]

    def map(self, fn: Callable[[T], R], items: Sequence[T], desc: str = "", progress: bool = True,
            initializer: Callable[[], None] | None = None) -> list[Outcome]:
        """``[(result, None) | (None, message)]`` per item, in order, each item a Ray task of 1 CPU (the cluster
        runs as many at once as it has CPUs). ``fn`` must be importable on every node (a module-level function)."""
        items = list(items)
        task = self._ray.remote(num_cpus=1, max_retries=RETRIES)(_run_task)
        refs = [task.remote(fn, it, initializer) for it in items]
        index = {ref: i for i, ref in enumerate(refs)}
        results: list[Outcome] = [(None, None)] * len(items)
        remaining = list(refs)
        with tqdm(total=len(items), desc=desc, unit="case", disable=not progress, leave=False) as bar:
            while remaining:
                done, remaining = self._ray.wait(remaining, num_returns=1)
                i = index[done[0]]
                results[i] = self._outcome(done[0], items[i])
                bar.update()
        return results

    def worker_options(self, workers: int | None) -> tuple[int, dict[str, Any]]:
        """How many actors :meth:`map_with` starts and the Ray options of each: by default one per GPU where the
        cluster has GPUs, else one per node; each reserves an equal share of the CPUs (at most a whole node) and,
        with GPUs, a GPU (a share of one when there are more workers than GPUs)."""
        cpus, gpus, nodes = self.resources()
        if not nodes:
            raise AutosegError(f"Ray cluster {self.where}: no alive node with CPUs; start workers with "
                               "`ray start --address HEAD:6379`")
        count = workers or gpus or len(nodes)
        options: dict[str, Any] = {"num_cpus": max(1, min(cpus // count, max(nodes))), "scheduling_strategy": "SPREAD"}
        if gpus:
            options["num_gpus"] = min(1.0, math.floor(gpus / count * 1e4) / 1e4)  # Ray takes 4 decimals
        return count, options

    def map_with(self, setup: Callable[[], S], fn: Callable[[S, T], R], items: Sequence[T],
                 workers: int | None = None, desc: str = "", progress: bool = True) -> list[Outcome]:
        """``[(result, None) | (None, message)]`` per item, in order: ``fn(state, item)`` on a pool of actors, each
        holding ``state = setup()`` (a model loaded once per worker), fed one item at a time as it comes free, so
        a slow case never holds up the queue. Options as :meth:`worker_options` (``workers`` actors, at most one
        per item). An ``AutosegError`` from ``setup`` is raised here, once."""
        items = list(items)
        if not items:
            return []
        count, options = self.worker_options(workers)
        actor = self._ray.remote(max_restarts=-1, max_task_retries=RETRIES, **options)(_CaseWorker)
        actors = [actor.remote(setup, fn) for _ in range(min(count, len(items)))]
        try:
            return self._feed(actors, items, desc, progress)
        finally:
            for a in actors:
                self._ray.kill(a)

    def _feed(self, actors: list[Any], items: list[Any], desc: str, progress: bool) -> list[Outcome]:
        starting = {a.ready.remote(): a for a in actors}
        running: dict[Any, tuple[int, Any]] = {}
        todo, idle = deque(range(len(items))), []
        results: list[Outcome] = [(None, None)] * len(items)
        with tqdm(total=len(items), desc=desc, unit="case", disable=not progress, leave=False) as bar:
            while todo or running:
                ref = self._ray.wait(list(starting) + list(running), num_returns=1)[0][0]
                if ref in starting:
                    a = starting.pop(ref)
                    try:
                        error = self._ray.get(ref)
                    except self._lost() as e:
                        error = f"its process died {RETRIES + 1} times while loading ({type(e).__name__})"
                    if error:
                        raise AutosegError(f"a worker on Ray cluster {self.where} could not start: {error}")
                else:
                    i, a = running.pop(ref)
                    results[i] = self._outcome(ref, items[i])
                    bar.update()
                idle.append(a)
                while idle and todo:
                    i, a = todo.popleft(), idle.pop()
                    running[a.run.remote(items[i])] = (i, a)
        return results

    def _lost(self) -> tuple[type[Exception], ...]:
        """Ray's errors for a task whose process or node died (rather than one that raised)."""
        x = self._ray.exceptions
        return x.WorkerCrashedError, x.RayActorError, x.NodeDiedError, x.OutOfMemoryError

    def _outcome(self, ref: Any, item: Any) -> Outcome:
        """The task's ``(result, error)``; a worker that died on every attempt becomes an error naming the item
        (a Python exception raised by the task itself is a bug and propagates)."""
        try:
            return self._ray.get(ref)
        except self._lost() as e:
            return None, (f"{describe(item)}: the worker process running it died {RETRIES + 1} times "
                          f"({type(e).__name__}: killed by the system, most likely out of memory, or its node was "
                          "lost); give each worker more memory (fewer workers per node) and rerun: finished outputs "
                          "are kept")


def _check_reachable(address: str) -> None:
    """Raise a clear error at once when nothing listens at ``HOST:PORT`` (``ray.init`` would wait for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as e:
        raise AutosegError(f"--cluster {address}: cannot join a Ray cluster there (nothing answers at {host}:{port}: "
                           f"{e}); start its head with `ray start --head` and pass the address it prints "
                           "(HOST:6379), or use --cluster local") from None


@contextlib.contextmanager
def open_cluster(address: str, num_cpus: int | None = None) -> Iterator[Cluster | None]:
    """Connect to Ray for the length of the block: ``local`` starts an embedded single-machine Ray with
    ``num_cpus`` CPUs (default: all), stopped at the end; ``auto`` joins the Ray head started on this machine with
    ``ray start --head``, or yields None when there is none (or Ray is not installed): run without Ray; anything else
    is the address of a running cluster (``HOST:6379``, ``ray://HOST:10001``). A Ray runtime this process has
    already joined is used as it is and left connected."""
    try:
        import ray
    except ImportError:
        if address == AUTO:
            print("--cluster auto: Ray is not installed, so there is no cluster to join; running in this process")
            yield None
            return
        raise AutosegError(f"--cluster {address}: needs Ray, which is not installed; {INSTALL_HINT}") from None
    if ray.is_initialized():
        yield Cluster(ray, "already joined by this process")
        return
    quiet = dict(log_to_driver=False, logging_level=logging.WARNING)
    try:
        if address == LOCAL:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                     object_store_memory=LOCAL_OBJECT_STORE_BYTES, **quiet)
        else:
            if address != AUTO:
                _check_reachable(address)
            ray.init(address=address, **quiet)
    except ConnectionError as e:
        if address == AUTO:
            print("--cluster auto: no Ray cluster is running on this machine (`ray start --head` starts one) and "
                  "RAY_ADDRESS is not set; running in this process")
            yield None
            return
        raise AutosegError(f"--cluster {address}: cannot join a Ray cluster there ({e}); start its head with "
                           "`ray start --head` and pass the address it prints (HOST:6379), or use --cluster local")
    try:
        yield Cluster(ray, "local" if address == LOCAL else ray.get_runtime_context().gcs_address or address)
    finally:
        ray.shutdown()
