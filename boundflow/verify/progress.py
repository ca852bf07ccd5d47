"""Progress of long searches: one line on the ``boundflow.verify`` logger every few seconds.

Silent unless that logger is enabled for INFO (``boundflow verify --progress`` does so, to
stderr), so library users opt in with ``logging``.
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger("boundflow.verify")


class Progress:
    def __init__(self, what: str, every: float = 5.0):
        self.what, self.every = what, every
        self.t0 = self.last = time.perf_counter()

    def tick(self, **fields) -> None:
        """Log ``fields`` if ``every`` seconds have passed since the last line."""
        now = time.perf_counter()
        if now - self.last >= self.every and log.isEnabledFor(logging.INFO):
            self.last = now
            log.info("%s %.1f s: %s", self.what, now - self.t0, ", ".join(f"{k} {v}" for k, v in fields.items()))
