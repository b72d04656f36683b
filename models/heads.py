"""Small torch heads scored on item/profile embeddings (trained online by :mod:`fusionrec.online.learning.scorers`)."""

from __future__ import annotations

import torch
from torch import nn


class InteractionHead(nn.Module):
    """MLP over ``[profile, item, profile * item, features]`` → one logit.

    The element-wise product lets a small MLP see alignment between the user's profile and the
    item directly, where a plain concatenation would have to learn it.
    """

    def __init__(self, dim: int, n_features: int, hidden: int = 64) -> None:
        super().__init__()
        self.dim = dim
        self.n_features = n_features
        self.net = nn.Sequential(nn.Linear(3 * dim + n_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, profile: torch.Tensor, item: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([profile, item, profile * item, features], dim=1)).squeeze(1)
