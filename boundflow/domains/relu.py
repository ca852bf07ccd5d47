"""The ReLU linear relaxation, as auto_LiRPA's CROWN defines it.

For pre-activation bounds [l, u]: upper line through (l, 0) and (u, u), i.e. slope
d = u / (u - l) and intercept -l d (identity when l >= 0, zero when u <= 0); lower line y = x
when u > -l, else y = 0 (the "adaptive" choice, y = 0 on a tie).
"""
from __future__ import annotations

import torch


def relax(ins, ps, attrs):
    """stack(lower, upper) -> stack(upper slope, upper intercept, lower slope)."""
    lo, hi = ins[0]
    lo_r = lo.clamp(max=0)
    hi_r = torch.maximum(hi.clamp(min=0), lo_r + 1e-8)   # keeps d finite when l = u = 0
    up_slope = hi_r / (hi_r - lo_r)
    up_bias = -lo_r * up_slope
    lo_slope = (up_slope > 0.5).to(lo.dtype)
    return (torch.stack((up_slope, up_bias, lo_slope)),)


RULES = {"relax": relax}
