"""Timer slack: how late a far deadline may fire, so that many share one wake-up.

Waking a thread costs ~30 us of CPU on a small VM, more than most timer work, and thousands
of idle clients each have a 25 s keepalive and a 60 s ICE check. As the kernel does for
``select``/``timerfd``, a deadline ``T`` seconds ahead may fire up to
``min(T * SLACK_FRACTION, MAX_SLACK)`` late, and it fires on a point of a 100/10/1 ms
grid inside that slack (the coarsest grid that has one), so deadlines of unrelated owners
(the Timer's sessions, the node's connections) land on the same instants and share a
wake-up. A deadline due now gets no slack.

Pure arithmetic: the Timer thread (``actors/timer.py``) and the Node core
(``gateway/node.py``) both use it.
"""

from __future__ import annotations

import math

#: A deadline may fire this fraction of its lead time late...
SLACK_FRACTION = 0.01
#: ...but never more than this late.
MAX_SLACK = 0.1
_GRID_STEPS = (0.1, 0.01, 0.001)
_ROUNDING = 1e-6  # of a grid step


def fire_at(deadline: float, now: float) -> float:
    """When ``deadline`` (seen at ``now``) fires, slack included; never before it.

    The first point, inside the slack, of the coarsest grid that has one. A deadline
    already on the 100 ms grid stays put, so a deadline snapped once is not moved again by
    an owner that re-arms it with less lead.
    """
    lead = deadline - now
    if lead <= 0:
        return deadline
    end = deadline + min(MAX_SLACK, lead * SLACK_FRACTION)
    for step in _GRID_STEPS:
        # The tolerance keeps a point that float rounding put a hair below the deadline.
        point = math.ceil(deadline / step - _ROUNDING) * step
        if point <= end:
            return max(point, deadline)
    return deadline
