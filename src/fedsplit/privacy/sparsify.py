"""Top-k sparsification of token vectors."""

from __future__ import annotations

import logging

import torch

from fedsplit.privacy.base import Defense, check_finite_positive, format_number

logger = logging.getLogger(__name__)


class SparsifyDefense(Defense):
    """Keeps the ``k`` largest-magnitude coordinates of every token vector and zeroes the rest.

    ``k = max(1, round(fraction * H))``. The output is ``hidden * mask`` with the mask
    computed without grad, so the gradient flows through the kept coordinates only.

    Args:
        fraction: share of coordinates kept per token, in ``(0, 1]``.
    """

    kind = "sparsify"

    def __init__(self, fraction: float) -> None:
        super().__init__()
        fraction = check_finite_positive("sparsify fraction", fraction)
        if fraction > 1:
            raise ValueError(f"sparsify fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction

    @property
    def name(self) -> str:
        return f"sparsify:{format_number(self.fraction)}"

    def num_kept(self, hidden_size: int) -> int:
        """Number of coordinates kept per token vector of size ``hidden_size``."""
        return min(hidden_size, max(1, round(self.fraction * hidden_size)))

    def mask(self, hidden: torch.Tensor) -> torch.Tensor:
        """0/1 mask (same dtype as ``hidden``) with exactly ``k`` ones per token vector."""
        k = self.num_kept(hidden.shape[-1])
        with torch.no_grad():
            index = hidden.detach().abs().topk(k, dim=-1).indices
            return torch.zeros_like(hidden).scatter_(-1, index, 1.0)

    def forward(self, hidden: torch.Tensor, pad_lengths: torch.Tensor | None = None) -> torch.Tensor:
        return hidden * self.mask(hidden)
