"""Measures how much CPU other processes use, to choose torch's OpenMP wait policy before torch loads.

Standard library only: imported by the ``deepregister`` command at start-up.

OpenMP wait policy (``register``, ``demo``): torch's OpenMP threads spin while they wait for each
other by default. On a quiet machine that is the fastest (a 128^3 pair, 2 cores: 2.3-2.9 s of
registration; 4.0-5.4 s with ``OMP_WAIT_POLICY=PASSIVE``), but when other processes keep a core
busy the spinning threads take turns with them: 6.9 s with one core busy (3.7-4.1 s passive), 28-57 s
with more load (4.5-6 s passive). The policy is read once, when torch loads (setting it later has
no effect), so before that the command measures how much CPU other processes use while it reads the
inputs and sets ``OMP_WAIT_POLICY=PASSIVE`` when torch's threads would have to share cores with
them (:func:`choose_openmp_wait_policy`); an ``OMP_WAIT_POLICY`` already set is left alone.
report.json says which policy ran.
"""

from __future__ import annotations

import os
import sys
import time



class CpuProbe:
    """CPU time that other processes use, from construction to :meth:`others_cpus`, on the CPUs
    this process may run on (Linux: per-CPU /proc/stat less this process's own time; elsewhere the
    1-minute load average; None where neither exists)."""

    def __init__(self) -> None:
        self.cpus = _usable_cpus()
        self.wall = time.monotonic()
        self.own = _own_cpu_seconds()
        self.busy = _busy_cpu_seconds(self.cpus)

    def others_cpus(self, min_seconds: float = 0.1) -> float | None:
        """CPUs kept busy by other processes since construction, measured over at least
        ``min_seconds`` (waits for the rest)."""
        if self.busy is None:
            try:
                return os.getloadavg()[0]
            except (AttributeError, OSError):
                return None
        time.sleep(max(0.0, self.wall + min_seconds - time.monotonic()))
        busy, own, wall = _busy_cpu_seconds(self.cpus), _own_cpu_seconds(), time.monotonic()
        if busy is None:
            return None
        return max(0.0, ((busy - self.busy) - (own - self.own)) / (wall - self.wall))


def _usable_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _busy_cpu_seconds(cpus: set[int]) -> float | None:
    """CPU seconds the processors ``cpus`` spent busy since boot (Linux), or None."""
    try:
        busy = 0
        with open("/proc/stat", encoding="ascii") as handle:
            for line in handle:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                    ticks = [int(value) for value in fields[:8]]  # user nice system idle iowait irq softirq steal
                    busy += sum(ticks) - ticks[3] - ticks[4]
        return busy / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def choose_openmp_wait_policy(probe: CpuProbe) -> str:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` when other processes keep busy so much of this process's
    CPUs that torch's threads would share cores with them (at least half a core beyond the CPUs
    its threads leave free), unless the variable is set already; see the module docstring.
    Returns the policy that runs, for the report. Effective only before torch is imported."""
    if "torch" in sys.modules:
        return f"{os.environ.get('OMP_WAIT_POLICY') or 'default'} (torch was loaded before this command)"
    if "OMP_WAIT_POLICY" in os.environ:
        return f"{os.environ['OMP_WAIT_POLICY'] or 'default'} (set before the command)"
    others = probe.others_cpus()
    if others is None:
        return "default (spinning)"
    try:
        threads = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        threads = len(probe.cpus)
    spare = len(probe.cpus) - min(max(threads, 1), len(probe.cpus))
    if others >= spare + 0.5:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return f"PASSIVE (other processes used {others:.1f} of {len(probe.cpus)} CPUs)"
    return f"default (spinning; other processes used {others:.1f} of {len(probe.cpus)} CPUs)"
