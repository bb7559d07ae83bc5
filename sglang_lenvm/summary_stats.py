"""Summary statistics of samples, one definition each: training lengths (gamma selection),
benchmark lengths and latencies, the soak's latencies."""

from __future__ import annotations

import math
from typing import Iterable, Optional


def mean(values: Iterable[float]) -> Optional[float]:
    """Arithmetic mean; None for no values."""
    v = list(values)
    return sum(v) / len(v) if v else None


def percentile(values: Iterable[float], q: float) -> Optional[float]:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]; None for no values."""
    v = sorted(values)
    if not v:
        return None
    pos = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)
