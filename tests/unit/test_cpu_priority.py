"""Batch work lowers its CPU priority where the scheduler honours it: its own niceness, and its
session's autogroup when the session is its own (how process managers start it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from batchsvc.cpu_priority import AUTOGROUP, autogroup_nice

needs_autogroup = pytest.mark.skipif(
    not AUTOGROUP.exists(), reason="this kernel has no autogroup scheduling"
)

# Lowers its priority by 7 (through the autogroup file given, if any) and reports what it sees.
LOWER = """
import json, os, sys
from pathlib import Path
from batchsvc.cpu_priority import AUTOGROUP, autogroup_nice, lower_cpu_priority
group = Path(sys.argv[1]) if len(sys.argv) > 1 else AUTOGROUP
lower_cpu_priority(7, group)
print(json.dumps({"nice": os.nice(0), "group": autogroup_nice(group)}))
"""


def lowered(*args: str, own_session: bool) -> dict[str, int | None]:
    done = subprocess.run(
        [sys.executable, "-c", LOWER, *args],
        capture_output=True,
        text=True,
        check=True,
        start_new_session=own_session,
    )
    return json.loads(done.stdout)


@needs_autogroup
def test_a_session_leader_lowers_its_autogroup_and_its_own_niceness() -> None:
    # Given a process that a process manager started in a session of its own
    # When it lowers its priority, Then its group and the task itself are both 7 nicer
    # (a new session's group starts at nice 0, whatever the group of the session it left)
    seen = lowered(own_session=True)
    assert seen == {"nice": min(19, os.nice(0) + 7), "group": 7}


@needs_autogroup
def test_a_process_sharing_its_shells_session_leaves_the_group_alone() -> None:
    # Given a process started in this (the test runner's) session
    # When it lowers its priority, Then only the task is nicer: the group is the whole session's
    seen = lowered(own_session=False)
    assert seen == {"nice": min(19, os.nice(0) + 7), "group": autogroup_nice()}


def test_the_group_nice_is_added_to_and_capped_at_19(tmp_path: Path) -> None:
    group = tmp_path / "autogroup"
    group.write_text("/autogroup-42 nice 15\n")
    assert lowered(str(group), own_session=True)["group"] == 19


def test_without_autogroup_only_the_task_is_nicer(tmp_path: Path) -> None:
    seen = lowered(str(tmp_path / "absent"), own_session=True)
    assert seen == {"nice": min(19, os.nice(0) + 7), "group": None}
