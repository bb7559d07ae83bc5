"""Regression targets, the loss, gamma selection and the prompt-boundary MRE.

A completion of L tokens (EOS included) gives L supervised states: t = 0 is the last prompt
token, t = L-1 the last token before EOS. Their Monte Carlo returns are
G_t = -(1 - gamma^(L-t)) (paper eq. 2/10); the LenVM predicts V = -sigmoid(z) (eq. 8).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch

from sglang_lenvm.returns import discounted_returns, remaining_from_p
from sglang_lenvm.summary_stats import percentile


def token_targets(length: int, gamma: float) -> torch.Tensor:
    """G_t for t = 0..L-1, float32 (computed in float64 first: 1 - gamma^k loses digits)."""
    if length < 1:
        raise ValueError(f"a completion has at least 1 token (its EOS), got length {length}")
    return discounted_returns(length, gamma).float()


def prediction(z: torch.Tensor) -> torch.Tensor:
    """The paper's value V = -sigmoid(z), in (-1, 0)."""
    return -torch.sigmoid(z.float())


def squared_error_sum(z: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                      censored: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum over supervised tokens of (V(s_t) - G_t)^2. z, targets, mask: [B, T].

    Where `censored` is 1 (a completion cut by max_tokens, kept with `--truncated censored`),
    G_t is only an upper bound: the true remaining length is at least L - t, so the true
    return is at most G_t. A prediction at or below the bound is consistent and costs
    nothing; one above it is penalized by its squared distance to the bound."""
    err = prediction(z) - targets
    if censored is not None:
        err = torch.where(censored > 0, err.clamp_min(0.0), err)
    return (err ** 2 * mask).sum()


def token_mean_mse(z: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Paper eq. 9: one average over all supervised tokens of the batch.

    Every token weighs the same, so a long completion contributes in proportion to its
    length. Averaging per sequence first (see `sequence_mean_mse`) would weight each token by
    1/L, a weight that depends on the future, and bias the fitted value toward short
    continuations (the paper's appendix E).
    """
    return squared_error_sum(z, targets, mask) / mask.sum().clamp_min(1)


def sequence_mean_mse(z: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean per sequence, then mean over sequences. NOT the training loss: kept to
    show (and test) how it differs from `token_mean_mse` when lengths differ."""
    err = (prediction(z) - targets) ** 2 * mask
    per_seq = err.sum(dim=1) / mask.sum(dim=1).clamp_min(1)
    return per_seq.mean()


def gamma_for_length(length: float, coverage: float = 0.99) -> float:
    """The gamma with 1 - gamma^length = coverage: a completion of `length` tokens gets a
    return of -coverage at its start, so lengths up to it stay distinguishable (the sigmoid
    does not saturate) while short lengths still spread over a useful range of values."""
    if length <= 0 or not 0 < coverage < 1:
        raise ValueError("length must be > 0 and coverage in (0, 1)")
    return math.exp(math.log(1.0 - coverage) / length)


def default_gamma(lengths: Iterable[int], q: float = 99.0, coverage: float = 0.99) -> float:
    """Default discount: 1 - gamma^(L_q) = coverage at the q-th percentile training length."""
    length = percentile([float(x) for x in lengths], q)
    if length is None:
        raise ValueError("no training lengths")
    return gamma_for_length(length, coverage)


def ground_truth_length(lengths: Sequence[int], gamma: float) -> float:
    """Paper eq. 13-14: L_GT = ln(1 - mean_i(1 - gamma^L_i)) / ln(gamma), the length whose
    return equals the mean return of the samples (not their mean length)."""
    mu = sum(1.0 - gamma ** L for L in lengths) / len(lengths)
    return remaining_from_p(mu, gamma)


def prompt_boundary_mre(predicted: Sequence[float], sample_lengths: Sequence[Sequence[int]],
                        gamma: float) -> float:
    """Paper eq. 15: mean over prompts of |L_hat - L_GT| / L_GT, where L_hat is the LenVM's
    length at the prompt boundary (state s_0) and L_GT comes from that prompt's samples."""
    if len(predicted) != len(sample_lengths) or not predicted:
        raise ValueError("need one prediction per prompt, and at least one prompt")
    errs = []
    for l_hat, lengths in zip(predicted, sample_lengths):
        l_gt = ground_truth_length(lengths, gamma)
        errs.append(abs(l_hat - l_gt) / l_gt)
    return sum(errs) / len(errs)
