"""The LenVM's value head, for serving (models/lenvm.py) and training (training/model.py) alike.

It reads the final-norm hidden state of a token: z = summary(SiLU(fc(h))), and
p = sigmoid(z) ~ 1 - gamma^remaining. Tensor names are the published layout's (`v_head.fc.*`,
`v_head.summary.*`, see checkpoint.py). The head is float32 whatever the backbone's dtype: p near
1 is where the length inversion ln(1-p)/ln(gamma) is most sensitive to rounding.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ValueHead(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.fc = nn.Linear(hidden_size, hidden_size, bias=True, dtype=torch.float32)
        self.summary = nn.Linear(hidden_size, 1, bias=True, dtype=torch.float32)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] hidden states -> [...] raw values z, in float32 (also under a bfloat16
        autocast of the backbone while training)."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            h = hidden.to(self.fc.weight.dtype)
            return self.summary(nn.functional.silu(self.fc(h))).squeeze(-1)

    def init_output(self, mean_p: float) -> None:
        """Start at the data's average value: zero output weights and bias = logit(mean p).
        The first training steps then learn structure instead of the global offset."""
        mean_p = min(max(mean_p, 1e-4), 1 - 1e-4)
        with torch.no_grad():
            self.summary.weight.zero_()
            self.summary.bias.fill_(math.log(mean_p / (1 - mean_p)))


class CandidateHead(nn.Module):
    """One-pass candidate values: z(s + x) for K candidate next tokens x of a state s, from the
    state's final hidden state h and each candidate's input embedding e(x):

        z(s + x) = summary(SiLU(state(h) + token(e(x))))

    so a guided step costs the LenVM one token per request (the state) instead of 1 + K (the
    star tree). It is distilled from the star tree's values (training/candidate_head.py) and
    ships beside the value head as `candidate_head.safetensors` (`c_head.*`). Float32, like
    the value head. `init_from` starts it as the value head itself (state = fc, token = 0):
    every candidate then gets the state's own value, and training learns the difference.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.state = nn.Linear(hidden_size, hidden_size, bias=True, dtype=torch.float32)
        self.token = nn.Linear(hidden_size, hidden_size, bias=False, dtype=torch.float32)
        self.summary = nn.Linear(hidden_size, 1, bias=True, dtype=torch.float32)

    def forward(self, hidden: torch.Tensor, cand_embeds: torch.Tensor) -> torch.Tensor:
        """hidden [B, H], cand_embeds [B, K, H] -> raw values z [B, K] (float32)."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            h = self.state(hidden.to(self.state.weight.dtype)).unsqueeze(1)
            e = self.token(cand_embeds.to(self.token.weight.dtype))
            return self.summary(nn.functional.silu(h + e)).squeeze(-1)

    def init_from(self, value_head: ValueHead) -> None:
        with torch.no_grad():
            self.state.weight.copy_(value_head.fc.weight)
            self.state.bias.copy_(value_head.fc.bias)
            self.token.weight.zero_()
            self.summary.weight.copy_(value_head.summary.weight)
            self.summary.bias.copy_(value_head.summary.bias)
