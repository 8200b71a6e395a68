"""Adam on the rows of a table, for the federated cores' server tables and device vectors."""

from __future__ import annotations

import numpy as np
import torch


class RowAdam:
    """Adam on rows of a table, with per-row step counts (rows are updated at different times)."""

    def __init__(
        self,
        shape: tuple[int, int],
        lr: float,
        b1: float = 0.9,
        b2: float = 0.999,
        eps: float = 1e-8,
    ) -> None:
        self.m = torch.zeros(shape)
        self.v = torch.zeros(shape)
        self.t = torch.zeros(shape[0])
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps

    def state(self) -> dict[str, np.ndarray]:
        """The moments and step counts, to keep on a device between messages."""
        return {"m": self.m.numpy(), "v": self.v.numpy(), "t": self.t.numpy()}

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        self.m, self.v, self.t = (torch.from_numpy(np.array(arrays[k])) for k in ("m", "v", "t"))

    def step(self, table: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """One Adam step on ``table[rows]`` with ``grad`` (aligned with ``rows``), in place."""
        self.t[rows] += 1
        t = self.t[rows][:, None]
        m = self.m[rows] = self.b1 * self.m[rows] + (1 - self.b1) * grad
        v = self.v[rows] = self.b2 * self.v[rows] + (1 - self.b2) * grad * grad
        m_hat = m / (1 - self.b1**t)
        v_hat = v / (1 - self.b2**t)
        table[rows] -= self.lr * m_hat / (v_hat.sqrt() + self.eps)
