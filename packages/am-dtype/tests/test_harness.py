"""The run_distributed internals, exercised in-process (no spawning): worker and collector."""

from __future__ import annotations

import queue
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from am_dtype import testing
from am_dtype.testing import free_port

sys.path.insert(0, str(Path(__file__).parent))
import am_dtype_dist_workers as workers  # noqa: E402

_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")


@pytest.fixture
def run_worker(monkeypatch):
    """Call the spawned-rank entry point in this process as a 1-rank group."""
    for key in _ENV:  # _worker writes these; monkeypatch puts the old values back
        monkeypatch.setenv(key, "unset")
    threads = torch.get_num_threads()

    def run(fn, *args):
        q: queue.Queue = queue.Queue()
        testing._worker(0, 1, free_port(), fn, args, q, 30.0)
        assert not dist.is_initialized()  # the group is always torn down
        return q.get_nowait()

    yield run
    torch.set_num_threads(threads)


def test_worker_reports_the_result(run_worker):
    assert run_worker(workers.report_rank, "hi") == (0, True, (0, 1, "hi"))


def test_worker_reports_a_traceback(run_worker):
    rank, ok, payload = run_worker(workers.report_rank)  # missing argument
    assert rank == 0 and not ok and "TypeError" in payload and "tag" in payload


def test_worker_reports_an_unpicklable_result_instead_of_losing_it(run_worker):
    rank, ok, payload = run_worker(workers.unpicklable_result)
    assert not ok and "pickle" in payload.lower()


class _Proc:
    def __init__(self, exitcode):
        self.exitcode = exitcode
        self.killed = False

    def kill(self):
        self.killed = True


class _Queue:
    """Hands out queued reports, then reports Empty like a timed-out mp.Queue."""

    def __init__(self, items, late=()):
        self.items, self.late = list(items), list(late)

    def get(self, timeout):
        if self.items:
            return self.items.pop(0)
        raise queue.Empty

    def empty(self):
        if self.late:  # a report that lands just after the timed-out get
            self.items.append(self.late.pop(0))
            return False
        return not self.items


def test_collector_names_a_rank_that_died_and_keeps_other_tracebacks():
    procs = [_Proc(0), _Proc(-9)]
    with pytest.raises(RuntimeError) as err:
        testing._collect(procs, _Queue([(0, False, "Traceback: boom")]), timeout_s=5)
    msg = str(err.value)
    assert "ranks [1] exited without reporting (exit codes [-9])" in msg
    assert "rank 0:\nTraceback: boom" in msg
    assert all(p.killed for p in procs)


def test_collector_reads_a_late_report_before_declaring_a_rank_dead():
    procs = [_Proc(0), _Proc(0)]
    results, failures = testing._collect(
        procs, _Queue([(0, True, "a")], late=[(1, True, "b")]), timeout_s=5
    )
    assert results == {0: "a", 1: "b"} and failures == {}


def test_collector_times_out(monkeypatch):
    clock = iter([0.0, 100.0])
    monkeypatch.setattr(testing.time, "monotonic", lambda: next(clock))
    with pytest.raises(RuntimeError, match="no result within 10s"):
        testing._collect([_Proc(None)], _Queue([]), timeout_s=5)
