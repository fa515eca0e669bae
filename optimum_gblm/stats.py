"""Input statistics a method asks the layer-wise pass to collect for each layer: running per-sequence means fed one
calibration batch at a time by a hook on the layer's input (Wanda's squared-activation mean, SparseGPT's Hessian).
"""

from __future__ import annotations

import torch


class RunningStats:
    """A per-sequence mean updated batch by batch, as the references do:
    v <- v n/(n+b); n <- n+b; v <- v + contribution(X_batch) / n."""

    def __init__(self, value: torch.Tensor):
        self.value = value
        self.num_sequences = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        batch = inputs.shape[0] if inputs.dim() == 3 else 1
        rows = inputs.reshape(-1, inputs.shape[-1]).float()
        self.value *= self.num_sequences / (self.num_sequences + batch)
        self.num_sequences += batch
        self.value += self.contribution(rows) / self.num_sequences

    def contribution(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class InputStats(RunningStats):
    """Wanda's activation statistic a_j = (1/N) sum_{n,t} x_{ntj}^2 over N sequences."""

    def __init__(self, d_in: int, device: torch.device):
        super().__init__(torch.zeros(d_in, dtype=torch.float32, device=device))

    def contribution(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.pow(2).sum(dim=0)

    @property
    def sq_mean(self) -> torch.Tensor:
        return self.value


class HessianStats(RunningStats):
    """The layer Hessian of the reconstruction loss, H = (2/N) sum_n X_n^T X_n over N sequences (SparseGPT's)."""

    def __init__(self, d_in: int, device: torch.device):
        super().__init__(torch.zeros(d_in, d_in, dtype=torch.float32, device=device))

    def contribution(self, rows: torch.Tensor) -> torch.Tensor:
        return 2 * rows.t() @ rows

    @property
    def hessian(self) -> torch.Tensor:
        return self.value
