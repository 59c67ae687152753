"""Multi-process test harness: run a function on N gloo ranks on CPU.

Every `am` package depends on am-dtype, so the harness lives here and each
package's distributed tests use the same real collectives (no mocks). A rank
that raises makes `run_distributed` raise with that rank's traceback; every
process group gets a timeout so a collective bug fails fast instead of hanging.

Ranks are forked from a forkserver that has torch (and transformers, when installed)
imported: a fresh interpreter per rank spent seconds of CPU on those imports, the largest
part of a small spawned test. Each rank still starts from the caller's current environment
and sys.path (applied before `fn` and its arguments are unpickled), as a spawned one did.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue as queue_mod
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """Return a TCP port that is free on localhost right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Imported once in the forkserver, inherited by every rank it forks: only third-party
# modules (ours are measured by coverage, which starts in each rank) that start no thread at
# import (a fork copies only the forking thread); missing ones are skipped.
_PRELOAD = [
    # the caller's main module (as spawn imports it): a script's own rank functions unpickle
    "__main__",
    "torch",
    "torch.distributed",
    "torch.distributed.tensor",
    "torch.distributed.fsdp",
    "torch.distributed.pipelining",
    "torch.distributed.checkpoint",
    "transformers",
    "transformers.modeling_utils",
]


def _worker(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple,
    queue: Any,
    timeout_s: float,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    # Ranks share two cores: one intra-op thread each avoids oversubscription.
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        result = fn(rank, world_size, *args)
        # Fail here, with a traceback, rather than in the queue's feeder thread (silently).
        pickle.dumps(result)
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _forked_worker(
    rank: int,
    world_size: int,
    port: int,
    payload: bytes,
    queue: Any,
    timeout_s: float,
    environ: dict[str, str],
    path: list[str],
) -> None:
    """A forkserver child's entry: the caller's environment and sys.path (the forkserver has
    those of its own start), then `_worker`. `fn` and its arguments come pickled so that they
    are loaded with the caller's sys.path. (Coverage's multiprocessing support measures these
    children as it did spawned ones.)"""
    os.environ.clear()
    os.environ.update(environ)
    sys.path[:] = path
    try:
        fn, args = pickle.loads(payload)
    except BaseException:  # noqa: BLE001 - e.g. fn's module not importable here
        queue.put((rank, False, traceback.format_exc()))
        return
    _worker(rank, world_size, port, fn, args, queue, timeout_s)


def _failure(why: str, failures: dict[int, str]) -> RuntimeError:
    tracebacks = "".join(f"\nrank {r}:\n{tb}" for r, tb in sorted(failures.items()))
    return RuntimeError(f"distributed run failed: {why}{tracebacks}")


def _collect(
    procs: list[Any], queue: Any, timeout_s: float
) -> tuple[dict[int, Any], dict[int, str]]:
    """Gather every rank's report; raise if a rank dies silently or time runs out."""
    results: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s * 2
    while len(results) + len(failures) < len(procs):
        try:
            rank, ok, payload = queue.get(timeout=1.0)
        except queue_mod.Empty:
            # A rank that exits without reporting (segfault, OOM kill) would otherwise hang us.
            dead = [
                i
                for i, p in enumerate(procs)
                if p.exitcode is not None and i not in results and i not in failures
            ]
            if dead and not queue.empty():
                continue  # its report arrived just after the timeout
            if dead or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                why = (
                    f"ranks {dead} exited without reporting (exit codes "
                    f"{[procs[i].exitcode for i in dead]})"
                    if dead
                    else f"no result within {timeout_s * 2:.0f}s"
                )
                raise _failure(why, failures) from None
            continue
        (results if ok else failures)[rank] = payload
    return results, failures


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 120.0,
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks (processes forked
    from a forkserver).

    `fn` must be importable (module level) and its return value picklable.
    Returns the per-rank results in rank order; raises RuntimeError carrying
    the traceback of every rank that failed (and naming ranks that died).
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    queue = ctx.Queue()
    port = free_port()
    payload = pickle.dumps((fn, args))
    extra = (dict(os.environ), list(sys.path))
    procs = [
        ctx.Process(
            target=_forked_worker, args=(r, world_size, port, payload, queue, timeout_s, *extra)
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results, failures = _collect(procs, queue, timeout_s)
    for p in procs:
        p.join(timeout=timeout_s)
        if p.is_alive():
            p.kill()
    if failures:
        raise _failure(f"ranks {sorted(failures)} raised", failures)
    bad_exit = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (0, None)]
    if bad_exit:
        raise RuntimeError(f"ranks exited abnormally (rank, exitcode): {bad_exit}")
    return [results[r] for r in range(world_size)]
