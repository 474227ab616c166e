"""Subprocesses the suite runs beside its own tests (the demo, the cluster application).

They start when collection ends and their tests run last, so they are never
what a test waits for until the end. They run at a lower CPU priority: the
foreground tests get the cores first, and the background work fills what the
foreground leaves idle (a driver planning a query uses one core of two).
"""

from __future__ import annotations

import shutil

NICENESS = 10


def lower_priority(command: list[str]) -> list[str]:
    """``command`` run through ``nice`` (which execs it: the process id stays the command's)."""
    nice = shutil.which("nice")
    return [nice, "-n", str(NICENESS), *command] if nice else list(command)
