"""Deadlines are ``time.perf_counter`` values (None: no deadline). Work that cannot stop midway
(a bound pass, an optimisation or attack step) starts only when its expected cost, measured
on earlier work like it, fits before the deadline."""
from __future__ import annotations

import time


def fits(seconds: float, deadline: float | None) -> bool:
    """Whether work of ``seconds`` started now ends by ``deadline``."""
    return deadline is None or time.perf_counter() + seconds <= deadline
