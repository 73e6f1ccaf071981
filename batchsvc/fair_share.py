"""Who gets a model's free dispatch slots: weighted fair sharing between projects, then between
each project's batches.

A free slot goes to the project, among those with pending lines, whose in-flight count divided by
its weight is lowest; then, within it, to its batch with the fewest lines in flight. Ties go to
whoever was served longest ago (round robin). The counts come from the model's in-flight set
as it is now (the caller reads them for every plan), so nothing kept in memory between plans can
drift from the truth: a dispatcher that restarts plans exactly as the one it replaced would have.

Pure functions over plain data: no Redis, no Celery.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BatchShare:
    batch_id: str
    project_id: str
    #: Lines of this batch in the model's in-flight set now.
    in_flight: int
    #: Lines of this batch for this model not yet dispatched.
    pending: int
    #: When it was last given a slot (a rising counter; -1: never).
    last_served: int = -1


@dataclass
class ProjectShare:
    project_id: str
    weight: int
    in_flight: int
    last_served: int = -1


def _ahead(a: ProjectShare, b: ProjectShare) -> bool:
    """Whether ``a`` comes before ``b``: a lower in-flight/weight (compared without division,
    so 1/3 and 2/6 tie exactly), then served longer ago, then by id (deterministic)."""
    left, right = a.in_flight * b.weight, b.in_flight * a.weight
    if left != right:
        return left < right
    if a.last_served != b.last_served:
        return a.last_served < b.last_served
    return a.project_id < b.project_id


def plan(
    free: int, projects: dict[str, ProjectShare], batches: list[BatchShare]
) -> list[tuple[str, int]]:
    """Hand out ``free`` slots one at a time; returns ``(batch_id, slots)`` in the order the
    batches were first chosen. ``projects`` must hold every project of ``batches`` (its
    ``in_flight`` counts every line the project has in flight for this model, including lines
    of batches with nothing left to dispatch). The inputs are updated as slots are handed out.
    """
    granted: dict[str, int] = {}
    by_project: dict[str, list[BatchShare]] = {}
    for batch in batches:
        if batch.pending > 0:
            by_project.setdefault(batch.project_id, []).append(batch)
    turn = max([p.last_served for p in projects.values()] + [b.last_served for b in batches] + [0])
    for _ in range(free):
        candidates = [projects[pid] for pid, owned in by_project.items() if owned]
        if not candidates:
            break
        project = candidates[0]
        for other in candidates[1:]:
            if _ahead(other, project):
                project = other
        owned = by_project[project.project_id]
        batch = min(owned, key=lambda b: (b.in_flight, b.last_served, b.batch_id))
        turn += 1
        project.in_flight += 1
        project.last_served = turn
        batch.in_flight += 1
        batch.last_served = turn
        batch.pending -= 1
        if batch.pending == 0:
            owned.remove(batch)
        granted[batch.batch_id] = granted.get(batch.batch_id, 0) + 1
    return list(granted.items())
