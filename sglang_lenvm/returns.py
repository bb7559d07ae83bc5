"""LenVM math: discounted returns <-> remaining lengths (pure functions, torch or float).

Convention (the paper's section 2, the serving code's sign): with per-token reward -(1-gamma),
the return after t of L generated tokens is G_t = -(1 - gamma^(L-t)). The value head outputs z
and p = sigmoid(z) ~ 1 - gamma^remaining, so p is in (0, 1), larger p means longer remaining,
EOS has p = 0, and remaining = ln(1 - p) / ln(gamma).
"""

from __future__ import annotations

import math
from typing import Union

import torch

Number = Union[float, torch.Tensor]

# p is clamped into [P_EPS, 1 - P_EPS] before inversion: ln(1 - p) is -inf at p = 1 and the
# length is 0 at p = 0. In float32, 1 - 1e-7 rounds to 1, so the clamp is dtype-aware.
P_EPS_F64 = 1e-12


def _p_eps(p: Number) -> float:
    if isinstance(p, torch.Tensor) and p.dtype != torch.float64:
        return float(torch.finfo(torch.float32).eps)  # ~1.19e-7; bf16/fp16 are upcast below
    return P_EPS_F64


def remaining_from_p(p: Number, gamma: float) -> Number:
    """Predicted remaining tokens l = ln(1 - p) / ln(gamma), with p clamped away from 0 and 1."""
    _check_gamma(gamma)
    eps = _p_eps(p)
    if isinstance(p, torch.Tensor):
        q = p.float() if p.dtype in (torch.float16, torch.bfloat16) else p
        q = q.clamp(0.0, 1.0 - eps)
        return torch.log1p(-q) / math.log(gamma)
    q = min(max(float(p), 0.0), 1.0 - eps)
    return math.log1p(-q) / math.log(gamma)


def p_from_remaining(remaining: Number, gamma: float) -> Number:
    """Target value for a remaining budget: p* = 1 - gamma^remaining (remaining >= 0)."""
    _check_gamma(gamma)
    if isinstance(remaining, torch.Tensor):
        r = remaining.to(torch.float64 if remaining.dtype == torch.float64 else torch.float32)
        return -torch.expm1(r.clamp_min(0.0) * math.log(gamma))
    return -math.expm1(max(float(remaining), 0.0) * math.log(gamma))


def p_from_z(z: Number) -> Number:
    return torch.sigmoid(z) if isinstance(z, torch.Tensor) else 1.0 / (1.0 + math.exp(-z))


def return_from_p(p: Number) -> Number:
    """The paper's value V = G = -p."""
    return -p


def discounted_returns(length: int, gamma: float) -> torch.Tensor:
    """G_t = -(1 - gamma^(L - t)) for t = 0..L-1 (t = 0 at the last prompt token)."""
    _check_gamma(gamma)
    t = torch.arange(length, dtype=torch.float64)
    return torch.expm1((length - t) * math.log(gamma))


def td_score(p: torch.Tensor, gamma: float) -> torch.Tensor:
    """s_t = gamma * p_t - p_{t-1} + (1 - gamma) for t >= 1 (positive: token lengthens).

    With the TD residual of the return V = -p and reward -(1-gamma), delta_t =
    r + gamma V_t - V_{t-1} = -(s_t); s_t is its negation so that positive means longer.
    `p` is [..., T]; returns [..., T-1].
    """
    _check_gamma(gamma)
    return gamma * p[..., 1:] - p[..., :-1] + (1.0 - gamma)


def _check_gamma(gamma: float) -> None:
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma must be in (0, 1), got {gamma}")
