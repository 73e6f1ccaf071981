"""Lowering the CPU priority of batch work, so that the API answers first on a shared host.

``os.nice`` alone is not enough on Linux. With autogroup scheduling (``CONFIG_SCHED_AUTOGROUP``,
on by default in most distribution kernels; ``/proc/sys/kernel/sched_autogroup_enabled``) the
scheduler first shares the CPU equally between *sessions*, and a task's nice value only ranks it
against the tasks of its own session. Process managers start each process in a session of its
own (honcho under ``make run``, the test and benchmark launcher, systemd), so a worker at nice 10
still got the same CPU as the API: measured here, two busy processes at nice 0 and two at nice
10, each in its own session, took 0.5 / 0.5 / 0.5 / 0.5 cores; with the autogroup's nice raised
too, 0.9 / 0.9 / 0.1 / 0.1.

The autogroup belongs to the whole session, so its nice is raised only by a process that leads
its session (one a process manager started). A worker started by hand from a shell shares the
shell's session and group; there the task nice already ranks it below its neighbours, and
raising the group's nice would lower the shell and everything else started from it.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Linux's per-session scheduling group of the calling process: "/autogroup-<id> nice <n>".
AUTOGROUP = Path("/proc/self/autogroup")

NICEST = 19


def lower_cpu_priority(nice: int, autogroup: Path = AUTOGROUP) -> None:
    """Add ``nice`` to this process's niceness, and to its session's autogroup if it leads it.

    Children started afterwards inherit both. Without autogroup support (another OS, or a
    kernel built without it) only the task's niceness changes.
    """
    if nice <= 0:
        return
    os.nice(nice)
    if os.getsid(0) != os.getpid():
        return
    current = autogroup_nice(autogroup)
    if current is None:
        return
    try:
        autogroup.write_text(str(min(NICEST, current + nice)))
    except OSError:
        return


def autogroup_nice(autogroup: Path = AUTOGROUP) -> int | None:
    """The nice value of this process's autogroup, or None where there is none."""
    try:
        return int(autogroup.read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None
