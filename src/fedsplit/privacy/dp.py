"""Differentially private release of hidden states: per-token L2 clipping + the Gaussian mechanism.

Each token vector ``h`` is clipped to L2 norm ``C`` and released as
``clip(h) + N(0, (sigma * C)^2 I)``. The unit of privacy is one token's clipped
hidden vector (the record). Clipping is differentiated by autograd (it is smooth
almost everywhere); the noise is additive, with an identity Jacobian.

What the guarantee covers, and what it does not (see ``docs/privacy.md``):

* It bounds what the server can learn about one released token vector. The head's
  attention mixes tokens, so one input token influences the vectors of all later
  positions; a sequence-level guarantee for ``T`` positions follows from group
  privacy (roughly ``sqrt(T)`` times the sensitivity), not from this epsilon.
* ``sample_rate < 1`` assumes the server cannot tell whether a record took part in
  a step (amplification by subsampling). With per-record hidden states that
  assumption is optimistic; ``sample_rate=1.0`` gives the conservative bound.
* Noise comes from torch's PRNG, which is not cryptographically secure.
"""

from __future__ import annotations

import logging

import torch

from fedsplit.privacy.accounting import (
    ACCOUNTANTS,
    NEIGHBOURING,
    Neighbouring,
    gaussian_epsilon,
    per_release_epsilon,
)
from fedsplit.privacy.base import Defense, check_finite_positive, format_number

logger = logging.getLogger(__name__)


def clip_tokens(hidden: torch.Tensor, clip: float) -> torch.Tensor:
    """Scale every token vector (last dim) down to L2 norm at most ``clip``; differentiable."""
    norms = hidden.float().norm(dim=-1, keepdim=True)
    factor = clip / norms.clamp_min(clip)  # == 1 (constant) for tokens already inside the ball
    return hidden * factor.to(hidden.dtype)


class DPDefense(Defense):
    """Per-token L2 clipping to ``clip`` followed by Gaussian noise of std ``sigma * clip``.

    Args:
        clip: clipping norm ``C`` (> 0).
        sigma: noise multiplier (noise std / ``C``); 0 disables the noise (no privacy,
            useful for tests).
        neighbouring: ``"add_remove"`` (sensitivity ``C``, DP-SGD convention) or
            ``"replace"`` (sensitivity ``2C``); see :mod:`fedsplit.privacy.accounting`.
        accountant: ``"rdp"`` or ``"pld"``; ``None`` picks RDP for add/remove, PLD for replace.
    """

    kind = "dp"

    def __init__(
        self,
        clip: float = 1.0,
        sigma: float = 1.0,
        neighbouring: Neighbouring = "add_remove",
        accountant: str | None = None,
    ) -> None:
        super().__init__()
        self.clip = check_finite_positive("dp clip", clip)
        self.sigma = check_finite_positive("dp sigma", sigma, allow_zero=True)
        if neighbouring not in NEIGHBOURING:
            raise ValueError(f"dp neighbouring must be one of {NEIGHBOURING}, got {neighbouring!r}")
        if accountant is not None and accountant not in ACCOUNTANTS:
            raise ValueError(f"dp accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        if neighbouring == "replace" and accountant == "rdp":
            raise ValueError(
                "dp: the RDP accountant does not support neighbouring=replace; use accountant=pld"
            )
        self.neighbouring = neighbouring
        self.accountant = accountant

    @property
    def name(self) -> str:
        spec = f"dp:clip={format_number(self.clip)},sigma={format_number(self.sigma)}"
        if self.neighbouring != "add_remove":
            spec += f",neighbouring={self.neighbouring}"
        if self.accountant is not None:
            spec += f",accountant={self.accountant}"
        return spec

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to each coordinate."""
        return self.sigma * self.clip

    def forward(self, hidden: torch.Tensor, pad_lengths: torch.Tensor | None = None) -> torch.Tensor:
        clipped = clip_tokens(hidden, self.clip)
        if self.sigma == 0:
            return clipped
        with torch.no_grad():
            noise = torch.randn_like(clipped) * self.noise_std
        return clipped + noise.detach()

    def privacy_spent(self, steps: int, sample_rate: float = 1.0, delta: float = 1e-5) -> tuple[float, float]:
        """``(epsilon, delta)`` after ``steps`` releases, each record Poisson-sampled with ``sample_rate``.

        For a training run, ``steps`` is the number of optimiser steps and
        ``sample_rate`` the batch size over the data-set size. For generation, every
        decoding step is a release of the new token's vector: count them.
        """
        epsilon = gaussian_epsilon(self.sigma, steps, sample_rate, delta, self.neighbouring, self.accountant)
        return epsilon, delta

    def epsilon_per_release(self, delta: float = 1e-5) -> float:
        """Epsilon of a single release (analytic Gaussian mechanism)."""
        return per_release_epsilon(self.sigma, delta, self.neighbouring)
