"""Peak resident memory of this process (for reports and benchmarks; no torch import)."""

from __future__ import annotations

import sys
from pathlib import Path


def peak_memory_mb() -> float | None:
    """Peak resident memory of this process in MB (None where the OS does not say, e.g. Windows).

    Linux: VmHWM, which starts afresh at exec; ``ru_maxrss`` survives exec, so a child process
    would report at least its parent's peak. Elsewhere: ``ru_maxrss``.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024.0 ** 2 if sys.platform == "darwin" else 1024.0), 1)
