"""The block-weight controller of one user group.

Input: per item group, its popularity and its recent training loss (standardised over groups).
Output: one softmax over all G_v * N units, scaled by G_v * N, so that the weights average 1 and
an untrained controller (zero last layer) reproduces the plain model (alpha = 1 everywhere).

The controller is trained from the gradient of the validation loss with respect to its output
weights, ``dL_val / d alpha``: :meth:`Controller.apply_weight_grad` back-propagates a given
weight gradient through the network. That is what the federated server does with the aggregate
of its devices' weight gradients, and what the centralized pipeline does with its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class ControllerConfig:
    hidden: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0


def controller_features(popularity: np.ndarray, item_groups: np.ndarray, group_loss: np.ndarray):
    """Feature vector (2 * G_v,): standardised log mean popularity and loss per item group."""
    num_item_groups = int(item_groups.max()) + 1
    counts = np.bincount(item_groups, weights=popularity, minlength=num_item_groups)
    sizes = np.bincount(item_groups, minlength=num_item_groups)
    pop = np.log1p(counts / np.maximum(sizes, 1))
    return np.concatenate([_standardise(pop), _standardise(np.asarray(group_loss, float))])


def _standardise(x: np.ndarray) -> np.ndarray:
    sd = x.std()
    return (x - x.mean()) / sd if sd > 1e-12 else np.zeros_like(x)


class Controller(nn.Module):
    """MLP: (popularity, loss) features of all item groups -> weights of all G_v x N units."""

    def __init__(self, num_item_groups: int, num_blocks: int, cfg: ControllerConfig | None = None):
        super().__init__()
        self.cfg = cfg or ControllerConfig()
        self.num_item_groups, self.num_blocks = num_item_groups, num_blocks
        self.net = nn.Sequential(
            nn.Linear(2 * num_item_groups, self.cfg.hidden),
            nn.Tanh(),
            nn.Linear(self.cfg.hidden, num_item_groups * num_blocks),
        )
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)
        self.optimizer = torch.optim.Adam(
            self.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Unit weights alpha, shape (G_v, N), positive, mean 1."""
        logits = self.net(features.to(self.net[0].weight.dtype))
        units = self.num_item_groups * self.num_blocks
        return (torch.softmax(logits, dim=-1) * units).reshape(
            self.num_item_groups, self.num_blocks
        )

    def weights(self, features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self(torch.as_tensor(features)).numpy().astype(np.float64)

    def apply_weight_grad(self, features: np.ndarray, weight_grad: np.ndarray) -> None:
        """One optimiser step of the controller given ``dL_val / d alpha`` (shape (G_v, N))."""
        self.optimizer.zero_grad(set_to_none=True)
        alpha = self(torch.as_tensor(features))
        alpha.backward(torch.as_tensor(weight_grad, dtype=alpha.dtype))
        self.optimizer.step()
