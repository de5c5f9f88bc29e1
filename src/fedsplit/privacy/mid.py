"""MID: a variational information bottleneck on the hidden states (the "MID" defence of VFLAIR-LLM).

MID ("mutual information regularised defence", a variational information
bottleneck) is one of the defences benchmarked by VFLAIR and, for LLM splits, by
VFLAIR-LLM (arXiv 2508.03097). This is our own implementation. Each token vector ``h`` is
encoded to a Gaussian posterior ``q(z | h) = N(mu, diag(exp(logvar)))`` in a
``d``-dimensional bottleneck, a sample ``z`` (the mean ``mu`` in eval mode) is decoded
back to the hidden size and sent. The client adds ``beta * KL(q(z|h) || N(0, I))`` to
its loss, which limits how much information about ``h`` the output carries.

The encoder/decoder are trained with the task by the client (it puts
``defense.parameters()`` in its optimiser); a freshly initialised MID destroys most
of the signal, so expect poor utility until it is trained.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fedsplit.privacy.base import Defense, check_finite_positive, format_number

logger = logging.getLogger(__name__)

# exp(logvar) beyond these bounds only produces inf/NaN or vanishing noise.
_LOGVAR_MIN, _LOGVAR_MAX = -20.0, 10.0


class MIDDefense(Defense):
    """Variational information bottleneck ``H -> d -> H`` with a KL penalty.

    Args:
        hidden_size: size ``H`` of the hidden states.
        bottleneck_dim: size ``d`` of the latent ``z``.
        beta: weight of the KL term returned by :meth:`extra_loss`.
    """

    kind = "mid"

    def __init__(self, hidden_size: int, bottleneck_dim: int, beta: float = 1e-3) -> None:
        super().__init__()
        if hidden_size < 1 or bottleneck_dim < 1:
            raise ValueError(
                f"mid needs hidden_size >= 1 and bottleneck_dim >= 1, got {hidden_size}, {bottleneck_dim}"
            )
        self.hidden_size = int(hidden_size)
        self.bottleneck_dim = int(bottleneck_dim)
        self.beta = check_finite_positive("mid beta", beta, allow_zero=True)
        self.encoder = nn.Linear(self.hidden_size, 2 * self.bottleneck_dim)
        self.decoder = nn.Linear(self.bottleneck_dim, self.hidden_size)
        self._kl: torch.Tensor | None = None

    @property
    def name(self) -> str:
        return f"mid:{self.bottleneck_dim},{format_number(self.beta)}"

    def forward(self, hidden: torch.Tensor, pad_lengths: torch.Tensor | None = None) -> torch.Tensor:
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"mid was built for hidden size {self.hidden_size}, got {hidden.shape[-1]}")
        stats = self.encoder(hidden.to(self.encoder.weight.dtype))
        mu, logvar = stats.chunk(2, dim=-1)
        logvar = logvar.clamp(_LOGVAR_MIN, _LOGVAR_MAX)
        if self.training:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        else:
            z = mu
        # KL(N(mu, var) || N(0, I)), summed over the bottleneck, averaged over tokens
        # (pad positions included: their side is not known here, and they are few).
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1)
        self._kl = kl.mean()
        return self.decoder(z).to(hidden.dtype)

    def extra_loss(self) -> torch.Tensor | None:
        """``beta * KL`` from the last forward (``None`` before the first forward)."""
        if self._kl is None:
            return None
        return self.beta * self._kl
