"""Progress reporting and cancellation: the callback contract, the error that cancels a registration,
and a one-line text progress bar for terminals (standard library only: the command line loads it at once).
"""

from __future__ import annotations

import sys
import time
from typing import Callable

#: ``progress(stage, fraction)``; returning ``False`` cancels the registration.
ProgressCallback = Callable[[str, float], "bool | None"]


class RegistrationCancelled(RuntimeError):
    """The progress callback asked to stop."""


def report_progress(progress: ProgressCallback | None, stage: str, fraction: float) -> None:
    """Tell ``progress`` (if any) that ``stage`` is ``fraction`` done; raise :class:`RegistrationCancelled`
    when it returns ``False``."""
    if progress is not None and progress(stage, fraction) is False:
        raise RegistrationCancelled(f"Registration cancelled during {stage}.")


class ProgressBar:
    """A one-line text progress bar with ETA on stderr (silent when stderr is not a terminal
    unless ``always``)."""

    def __init__(self, always: bool = False) -> None:
        self.enabled = always or sys.stderr.isatty()
        self.start = time.perf_counter()
        self.stage = ""

    def __call__(self, stage: str, fraction: float) -> None:
        if not self.enabled:
            return
        if stage != self.stage:
            self.stage, self.start = stage, time.perf_counter()
        elapsed = time.perf_counter() - self.start
        eta = f"ETA {elapsed / fraction - elapsed:4.0f} s" if 0 < fraction < 1 else " " * 8
        filled = int(30 * fraction)
        sys.stderr.write(f"\r{stage:<10} [{'#' * filled}{'.' * (30 - filled)}] {fraction:4.0%} {eta}")
        if stage == "output" and fraction >= 1:
            sys.stderr.write("\n")
        sys.stderr.flush()

