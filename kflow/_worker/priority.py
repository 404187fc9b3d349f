"""Which priority level a saturated worker serves next: the selection policy, as pure functions.

Tasks of a queue arrive on one topic per level (see :meth:`kflow.streams.topics.TopicNames.tasks`).
When a worker has more ready tasks than free slots it must choose a level; the loop asks
:func:`next_level` with the number of tasks known to wait per level and records each task it
starts with :func:`served`.

* ``strict``: always the most urgent level with work (a flood of critical work stops the rest).
* ``weighted`` (default): smooth weighted round robin over the levels with work. Every level with
  work gains its weight of credit each time a task starts; the level with the most credit is
  served and pays the sum of the weights in play, so over ``W`` starts (``W`` the total weight
  of the levels with work) a level of weight ``w`` gets ``w`` of them, spread out: it waits at
  most ``2 * ceil(W / w)`` starts for its turn (checked for every set of levels by the unit
  tests), so no level with work starves. A level without work holds no credit, so idling never
  banks a burst.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

__all__ = ["DEFAULT_WEIGHTS", "Policy", "next_level", "served"]

Policy = Literal["weighted", "strict"]

#: Default weights of the levels 1 (critical) .. 5 (background).
DEFAULT_WEIGHTS: Mapping[int, int] = {1: 100, 2: 50, 3: 20, 4: 10, 5: 5}


def next_level(waiting: Mapping[int, int], policy: Policy, credit: Mapping[int, int],
               weights: Mapping[int, int] = DEFAULT_WEIGHTS) -> int | None:
    """The level to serve next, given how many tasks wait per level; None when none waits.

    Asking again without :func:`served` in between gives the same answer.
    """
    ready = [level for level in sorted(waiting) if waiting[level] > 0]
    if len(ready) <= 1 or policy == "strict":
        return ready[0] if ready else None
    # ties go to the more urgent level: max() keeps the first of equal keys, and ready is sorted
    return max(ready, key=lambda level: credit.get(level, 0) + weights[level])


def served(level: int, waiting: Mapping[int, int], credit: Mapping[int, int],
           weights: Mapping[int, int] = DEFAULT_WEIGHTS) -> dict[int, int]:
    """The credit after a task of ``level`` started while ``waiting`` tasks waited per level."""
    ready = {lv for lv, n in waiting.items() if n > 0} | {level}
    out = {lv: credit.get(lv, 0) + weights[lv] for lv in ready}
    out[level] -= sum(weights[lv] for lv in ready)
    return out
