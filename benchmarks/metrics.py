"""Statistics of measured numbers: mean and percentile (the package's one definition, see
sglang_lenvm/summary_stats.py), and seconds per token from streamed token times."""

from __future__ import annotations

from sglang_lenvm.summary_stats import mean, percentile

__all__ = ["mean", "percentile", "latency_at"]


def latency_at(times: list[tuple[float, int]], position: int, window: int) -> float:
    """Seconds per token between positions position - window and position + window.

    Streamed chunks can carry several tokens, so the rate is taken between the first chunks
    that reach the two positions rather than chunk by chunk.
    """
    def first_at(n):
        return next(((t, m) for t, m in times if m >= n), None)

    a, b = first_at(position - window), first_at(position + window)
    if a is None or b is None or b[1] <= a[1]:
        raise RuntimeError(f"not enough tokens streamed around position {position}")
    return (b[0] - a[0]) / (b[1] - a[1])
