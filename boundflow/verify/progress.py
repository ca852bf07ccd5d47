"""Progress of long searches: one line on the ``boundflow.verify`` logger every few seconds.

Silent unless that logger is enabled for INFO (``boundflow verify --progress`` does so, to
stderr), so library users opt in with ``logging``. A search that passes its queue length and
deadline also gets an outlook: whether, at the rate the queue changed since the last line, it
empties before the deadline. Only a forecast for the person watching; verdicts never rest on it.
"""
from __future__ import annotations

import logging
import math
import time

log = logging.getLogger("boundflow.verify")


def outlook(queued_before: int, queued: int, seconds: float, seconds_left: float) -> str:
    """The queue went from queued_before to queued in `seconds`; `seconds_left` to the deadline."""
    rate = (queued - queued_before) / seconds
    left = f"{seconds_left:.0f} s left" if math.isfinite(seconds_left) else "no deadline"
    if queued == 0:
        return "queue empty"
    if rate >= 0:
        return f"queue {rate:+.0f}/s: not emptying at this rate ({left})"
    eta = queued / -rate
    when = "before" if eta <= seconds_left else "after"
    return f"queue {rate:+.0f}/s: empties in ~{eta:.0f} s at this rate, {when} the deadline ({left})"


class Progress:
    def __init__(self, what: str, every: float = 5.0):
        self.what, self.every = what, every
        self.t0 = self.last = time.perf_counter()
        self.queued_at_last: int | None = None

    def tick(self, queued: int | None = None, deadline: float | None = None, **fields) -> None:
        """Log ``fields`` (and the queue length, with its outlook when a deadline is given) if
        ``every`` seconds have passed since the last line."""
        now = time.perf_counter()
        if now - self.last < self.every or not log.isEnabledFor(logging.INFO):
            return
        if queued is not None:
            fields["queued"] = queued
            if deadline is not None and self.queued_at_last is not None and now > self.last:
                fields["outlook"] = outlook(self.queued_at_last, queued, now - self.last, deadline - now)
            self.queued_at_last = queued
        self.last = now
        log.info("%s %.1f s: %s", self.what, now - self.t0, ", ".join(f"{k} {v}" for k, v in fields.items()))
