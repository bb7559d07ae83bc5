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
