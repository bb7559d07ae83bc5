import math

import pytest
import torch

from sglang_lenvm import returns


def test_remaining_roundtrip_hand_computed():
    g = 0.9
    # 3 tokens left: p = 1 - 0.9^3 = 0.271
    assert returns.p_from_remaining(3, g) == pytest.approx(0.271, abs=1e-12)
    assert returns.remaining_from_p(0.271, g) == pytest.approx(3.0, abs=1e-9)
    assert returns.remaining_from_p(0.0, g) == 0.0
    t = torch.tensor([0.0, 0.1, 0.19, 0.271], dtype=torch.float64)
    assert torch.allclose(returns.remaining_from_p(t, g), torch.tensor([0.0, 1, 2, 3.0],
                                                                       dtype=torch.float64))


def test_remaining_clamped_near_one():
    g = 0.997
    # p = 1 would be an infinite length: clamped to a finite, large value.
    assert math.isfinite(returns.remaining_from_p(1.0, g))
    assert returns.remaining_from_p(1.0, g) > 5000
    p32 = torch.tensor([1.0, 0.9999999], dtype=torch.float32)
    out = returns.remaining_from_p(p32, g)
    assert torch.isfinite(out).all() and (out > 1000).all()
    assert returns.remaining_from_p(-0.5, g) == 0.0  # below 0 means "ends now"


def test_discounted_returns_match_definition():
    g, L = 0.9, 4
    G = returns.discounted_returns(L, g)
    expected = [-(1 - g ** (L - t)) for t in range(L)]  # -(1-g^4), ..., -(1-g)
    assert torch.allclose(G, torch.tensor(expected, dtype=torch.float64))
    # Bellman: G_t = r + g G_{t+1}, with r = -(1-g) and G_L = 0
    nxt = torch.cat([G[1:], torch.zeros(1, dtype=torch.float64)])
    assert torch.allclose(G, -(1 - g) + g * nxt)


def test_td_score_hand_computed():
    g = 0.9
    p = torch.tensor([0.271, 0.19, 0.5])
    s = returns.td_score(p, g)
    # an on-track token (3 -> 2 remaining) scores 0; a jump to a long horizon scores positive
    assert s[0].item() == pytest.approx(0.9 * 0.19 - 0.271 + 0.1, abs=1e-6)
    assert s[0].item() == pytest.approx(0.0, abs=1e-6)
    assert s[1].item() == pytest.approx(0.9 * 0.5 - 0.19 + 0.1, abs=1e-6) and s[1] > 0


def test_gamma_validated():
    with pytest.raises(ValueError):
        returns.remaining_from_p(0.5, 1.0)
    with pytest.raises(ValueError):
        returns.p_from_remaining(3, 0.0)
