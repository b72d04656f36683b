"""Small torch heads scored on item/profile embeddings (trained online by :mod:`fusionrec.online.learning.scorers`)."""

from __future__ import annotations

import numpy as np
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

    def logits(self, profile: np.ndarray, item: np.ndarray, features: np.ndarray) -> np.ndarray:
        """:meth:`forward` for inference on float32 arrays, rows that share a profile computed together.

        A pool's rows all carry its user's profile ``p``. The first layer's ``W_p p + W_i i +
        W_pi (p * i)`` is then ``W_p p + (W_i + W_pi diag(p)) i``: one matrix per run of equal profile
        rows, applied to the item vectors, a third of the multiplications of the concatenated input.
        Rows whose profiles change often (fewer than ``MIN_RUN`` rows per run) take the plain product.
        """
        d = self.dim
        first, out = self.net[0], self.net[2]
        assert isinstance(first, nn.Linear) and isinstance(out, nn.Linear)
        w, bias = first.weight.detach().numpy(), first.bias.detach().numpy()
        w_out, b_out = out.weight.detach().numpy()[0], float(out.bias.detach().numpy()[0])
        n = len(features)
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        w_p, w_i, w_pi, w_f = w[:, :d], w[:, d: 2 * d], w[:, 2 * d: 3 * d], w[:, 3 * d:]
        changes = np.flatnonzero((profile[1:] != profile[:-1]).any(axis=1)) + 1
        starts = np.concatenate([[0], changes, [n]])
        if n < MIN_RUN * (len(starts) - 1):
            hidden = np.concatenate([profile, item, profile * item, features], axis=1) @ w.T + bias
        else:
            hidden = features @ w_f.T + bias
            for lo, hi in zip(starts[:-1], starts[1:], strict=True):
                p = profile[lo]
                hidden[lo:hi] += item[lo:hi] @ (w_i + w_pi * p).T + w_p @ p
        return np.maximum(hidden, 0.0) @ w_out + b_out


MIN_RUN = 16  # rows per run of one profile from which the grouped product pays
