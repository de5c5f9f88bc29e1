"""Additive-noise defences: Gaussian, Laplace, d_X-privacy (metric DP), and Gaussian noise on gradients.

All of them add ``noise.detach()`` to the input, so the Jacobian is the identity:
the client's backward goes through as if there were no noise (the gradient is
evaluated at the noisy point by the server's body, which is what the client can
observe anyway).

"Relative" scales
-----------------
Hidden states: ``std`` (or the Laplace scale) is multiplied by the RMS of *each token
vector*, computed without grad. Per-token rather than per-sequence so that (1) a
token gets the same signal-to-noise ratio whether it is sent in a training batch,
in a prefill or alone in a decoding step, (2) a high-norm token (e.g. an attention
sink at position 0) does not inflate the noise on every other token, and (3) the
defence stays a per-token map, which the DP composition argument of
:class:`~fedsplit.privacy.base.Compose` relies on.

Gradients: ``std`` is multiplied by the *largest per-token L2 norm* in the gradient
tensor (the batch): the noise on every coordinate is ``std`` times the norm of the
strongest token gradient, the calibration of the Gaussian mechanism with that norm as
sensitivity. One scale for the whole batch, because a per-example scale would keep the
ratio of per-example gradient norms intact, which is exactly what norm-based
label-leakage attacks use. Not the RMS of the whole tensor: with an answer-only loss
nearly every position's gradient is ~0, so that RMS is the answer positions' divided
by about the square root of the sequence length, and the direction of the answer
gradient (what clustering attacks use) survives noise many "RMS" strong.
"""

from __future__ import annotations

import logging

import torch

from fedsplit.privacy.base import Defense, GradDefense, check_finite_positive, format_number, token_rms

logger = logging.getLogger(__name__)


def _mode_suffix(relative: bool) -> str:
    return ":relative" if relative else ""


class GaussianDefense(Defense):
    """Adds i.i.d. ``N(0, std^2)`` noise to every coordinate of the hidden states.

    Args:
        std: noise standard deviation (absolute), or a fraction of each token's RMS
            if ``relative``.
        relative: scale ``std`` by the per-token RMS of the hidden states.

    Not a DP mechanism on its own (no sensitivity bound): use ``dp`` for that.
    """

    kind = "gaussian"

    def __init__(self, std: float, relative: bool = False) -> None:
        super().__init__()
        self.std = check_finite_positive("gaussian std", std, allow_zero=True)
        self.relative = bool(relative)

    @property
    def name(self) -> str:
        return f"gaussian:{format_number(self.std)}{_mode_suffix(self.relative)}"

    def forward(self, hidden: torch.Tensor, pad_lengths: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            noise = torch.randn_like(hidden) * self.std
            if self.relative:
                noise = noise * token_rms(hidden)
        return hidden + noise.detach()


class LaplaceDefense(Defense):
    """Adds i.i.d. ``Laplace(0, b)`` noise to every coordinate (the VFLAIR-LLM Laplace defence).

    The per-coordinate standard deviation is ``sqrt(2) * b``.

    Args:
        scale: the Laplace scale ``b`` (absolute), or a fraction of each token's RMS
            if ``relative``.
        relative: scale ``b`` by the per-token RMS of the hidden states.
    """

    kind = "laplace"

    def __init__(self, scale: float, relative: bool = False) -> None:
        super().__init__()
        self.scale = check_finite_positive("laplace scale", scale, allow_zero=True)
        self.relative = bool(relative)

    @property
    def name(self) -> str:
        return f"laplace:{format_number(self.scale)}{_mode_suffix(self.relative)}"

    def forward(self, hidden: torch.Tensor, pad_lengths: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            # The difference of two Exp(1) variables is Laplace(0, 1).
            noise = torch.empty_like(hidden).exponential_() - torch.empty_like(hidden).exponential_()
            noise = noise * self.scale
            if self.relative:
                noise = noise * token_rms(hidden)
        return hidden + noise.detach()


class DXDefense(Defense):
    """d_X-privacy (metric DP) on token vectors: noise ``z`` with density proportional to ``exp(-eta * ||z||)``.

    Sampled as a direction uniform on the unit sphere of R^H times a norm drawn from
    ``Gamma(shape=H, rate=eta)`` (mean norm ``H / eta``), as in Feyisetan et al.,
    "Privacy- and Utility-Preserving Textual Analysis via Calibrated Multivariate
    Perturbations" (WSDM 2020). Each release is ``eta * ||x - x'||``-indistinguishable
    for any two token vectors ``x, x'`` (an L2 metric guarantee, not (epsilon, delta)),
    so :meth:`privacy_spent` returns ``None``; see :meth:`metric_epsilon`.

    Args:
        eta: privacy parameter per unit L2 distance; smaller is more private.
    """

    kind = "dx"

    def __init__(self, eta: float) -> None:
        super().__init__()
        self.eta = check_finite_positive("dx eta", eta)

    @property
    def name(self) -> str:
        return f"dx:{format_number(self.eta)}"

    def metric_epsilon(self, steps: int = 1) -> float:
        """Epsilon per unit L2 distance after ``steps`` releases of the same vector (basic composition)."""
        return self.eta * steps

    def forward(self, hidden: torch.Tensor, pad_lengths: torch.Tensor | None = None) -> torch.Tensor:
        size = hidden.shape[-1]
        with torch.no_grad():
            direction = torch.randn(hidden.shape, device=hidden.device, dtype=torch.float32)
            direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            gamma = torch.distributions.Gamma(
                torch.tensor(float(size), device=hidden.device), torch.tensor(self.eta, device=hidden.device)
            )
            radius = gamma.sample(hidden.shape[:-1] + (1,))
            noise = (direction * radius).to(hidden.dtype)
        return hidden + noise.detach()


class GaussianGradDefense(GradDefense):
    """Adds ``N(0, std^2)`` noise to the gradient copy that is sent to the server.

    Args:
        std: noise standard deviation (absolute), or a multiple of the largest per-token
            L2 norm of the gradient tensor if ``relative`` (see the module docstring).
        relative: scale ``std`` by the largest per-token L2 norm of the gradient tensor.
    """

    kind = "gaussian"

    def __init__(self, std: float, relative: bool = False) -> None:
        self.std = check_finite_positive("gradient gaussian std", std, allow_zero=True)
        self.relative = bool(relative)

    @property
    def name(self) -> str:
        return f"gaussian:{format_number(self.std)}{_mode_suffix(self.relative)}"

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            grad = grad.detach()
            noise = torch.randn_like(grad) * self.std
            if self.relative:
                noise = noise * grad.float().norm(dim=-1).max().to(grad.dtype)
            return grad + noise
