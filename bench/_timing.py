"""Timing helpers shared by the bench/ scripts, made for a CPU shared with other processes.

- `fix_threads(n)`: one fixed intra-op thread count for the whole run (printed with it).
- `load_average()`: the 1/5/15-minute load averages and the core count, as a string the
  scripts print next to every table, so two ratios can be compared knowing how busy the
  machine was.
- `interleaved(fns, repeats)`: runs the cases interleaved (A, B, A, B, ... in a rotating
  order) and returns, per case, the median wall-clock and the median CPU seconds of the
  calls. A burst of load from another process then hits every case alike.

Why CPU seconds too: with one intra-op thread, a call's CPU time (`time.process_time`, all
threads of this process) is the work it did, whatever share of a core the scheduler gave it;
its wall time also counts the time it waited for a core. On a machine where other jobs come
and go, ratios of CPU times stay within a few percent where ratios of wall times swing by
tens of percent. With several threads CPU time also counts OpenMP workers spinning while a
sibling is descheduled, so it is only the better measure at one thread.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = [
    "CLOCKS",
    "Timing",
    "default_clock",
    "fix_threads",
    "interleaved",
    "load_1min",
    "load_average",
]

CLOCKS = ("cpu", "wall")


def default_clock(threads: int) -> str:
    """'cpu' at one thread (see the module docstring), else 'wall'."""
    return "cpu" if threads == 1 else "wall"


def fix_threads(threads: int) -> int:
    """Set torch's intra-op thread count to `threads` (>= 1) and return it."""
    if threads < 1:
        raise ValueError(f"threads={threads} must be >= 1")
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def load_average() -> str:
    """'load 1/5/15 min: a/b/c on N cores' (os.getloadavg), or a note where unavailable."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average unavailable"
    return f"load 1/5/15 min: {one:.2f}/{five:.2f}/{fifteen:.2f} on {os.cpu_count()} cores"


def load_1min() -> str:
    """The 1-minute load average as a short string ('n/a' where unavailable)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


@dataclass
class Timing:
    """Per-call seconds of one case: every repeat's wall and CPU time, and their medians."""

    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpus)

    def median(self, clock: str) -> float:
        """Median seconds on `clock` ('cpu' or 'wall')."""
        if clock not in CLOCKS:
            raise ValueError(f"clock={clock!r} is not supported; accepted: {list(CLOCKS)}")
        return self.cpu if clock == "cpu" else self.wall


def interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    after: Callable[[str], None] | None = None,
) -> dict[str, Timing]:
    """Time each fn `repeats` times, interleaved; `after(name)` runs untimed after each call.

    Repeat r runs the cases in the order rotated by r (A B C, B C A, ...), so no case is
    always first after a warm-up or always right after the same neighbour.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
            if after is not None:
                after(name)
    out = {name: Timing() for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            wall0, cpu0 = time.perf_counter(), time.process_time()
            fns[name]()
            cpu1, wall1 = time.process_time(), time.perf_counter()
            out[name].walls.append(wall1 - wall0)
            out[name].cpus.append(cpu1 - cpu0)
            if after is not None:
                after(name)
    return out


def select_points(points: list[tuple], spec: str | None) -> list[tuple]:
    """The sweep points (tuples whose first item is the label) that the comma-separated
    `spec` names, in sweep order; every point when `spec` is None. An unknown label exits
    naming it and the accepted ones."""
    if spec is None:
        return list(points)
    wanted = [p.strip() for p in spec.split(",")]
    known = [point[0] for point in points]
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f"--points {unknown} not in the sweep; accepted: {known}")
    return [point for point in points if point[0] in wanted]
