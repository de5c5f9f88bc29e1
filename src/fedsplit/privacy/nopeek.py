"""NoPeek: a distance-correlation penalty between the head's input embeddings and the states it sends.

NoPeek (Vepakomma et al., "NoPeek: Information leakage reduction to share activations
in distributed deep learning", ICDMW 2020) trains the client's layers to keep the
activations it shares statistically far from its raw input: the client adds
``lambda * dCor(X, Z)`` to its task loss, where ``X`` is the input and ``Z`` what is sent.
Here ``X`` is the token embeddings the head reads and ``Z`` the head's output hidden
states, one row per real (non-pad) token position of the batch.

Estimator. The plain (V-statistic) sample distance correlation is strongly biased
upwards in high dimension: for two *independent* 576-dimensional Gaussian samples of
512 rows it is about 0.90, so as a penalty it would mostly measure its own bias. We use
the bias-corrected squared distance correlation of Székely & Rizzo ("Partial distance
correlation with methods for dissimilarities", Ann. Statist. 2014; U-centred distance
matrices), which is about 0 for independent samples and exactly 1 for ``Z = a X + b``;
it is clamped at 0 (a negative estimate means "no dependence seen"). Its cost is
``O(n^2 (E + H))`` for ``n`` positions, so at most ``positions`` (default 512) real
positions are drawn at random (torch's global generator) from each batch.

The penalty is computed only when autograd is on (training); the embeddings are taken
without grad, so it trains the head (and any trainable defence before it), not the
embedding table. On the hidden states themselves NoPeek is the identity: compose it
with noise, e.g. ``nopeek:0.5+gaussian:0.1:relative``.
"""

from __future__ import annotations

import logging

import torch

from fedsplit.privacy.base import Defense, check_finite_positive, format_number, real_token_mask

logger = logging.getLogger(__name__)

DEFAULT_POSITIONS = 512


def _pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distance matrix ``[n, n]`` of the rows of ``x``, differentiable at 0 (gradient 0 there)."""
    sq = x.pow(2).sum(dim=-1)
    d2 = sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (x @ x.T)
    # The clamp both absorbs the rounding of the Gram form and keeps sqrt's gradient finite on the diagonal.
    return d2.clamp_min(1e-12).sqrt()


def _u_centre(a: torch.Tensor) -> torch.Tensor:
    """U-centring of a distance matrix (Székely & Rizzo 2014, eq. 2.3): zero diagonal, unbiased products."""
    n = a.shape[0]
    a = a - torch.diag_embed(torch.diagonal(a))
    rows = a.sum(dim=1, keepdim=True) / (n - 2)
    cols = a.sum(dim=0, keepdim=True) / (n - 2)
    total = a.sum() / ((n - 1) * (n - 2))
    centred = a - rows - cols + total
    return centred - torch.diag_embed(torch.diagonal(centred))


def _v_centre(a: torch.Tensor) -> torch.Tensor:
    return a - a.mean(dim=0, keepdim=True) - a.mean(dim=1, keepdim=True) + a.mean()


def distance_correlation_sq(x: torch.Tensor, y: torch.Tensor, bias_corrected: bool = True) -> torch.Tensor:
    """Squared sample distance correlation of paired rows ``x [n, p]``, ``y [n, q]`` (a scalar in [0, 1]).

    Args:
        x, y: the two samples, one row per observation (same ``n``; ``n >= 4`` when bias-corrected).
        bias_corrected: the U-centred estimator (about 0 for independent samples in any
            dimension); ``False`` gives the classical V-statistic of Székely, Rizzo & Bakirov (2007).

    Computed in float32 (or the inputs' dtype if wider); differentiable in both arguments.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"distance correlation needs paired samples, got {x.shape[0]} and {y.shape[0]} rows")
    n = x.shape[0]
    if n < (4 if bias_corrected else 2):
        raise ValueError(f"distance correlation needs at least {4 if bias_corrected else 2} rows, got {n}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    x, y = x.reshape(n, -1).to(dtype), y.reshape(n, -1).to(dtype)
    centre = _u_centre if bias_corrected else _v_centre
    a, b = centre(_pairwise_distances(x)), centre(_pairwise_distances(y))
    # The normalisation (1/n^2 or 1/(n(n-3))) cancels in the ratio.
    xy, xx, yy = (a * b).sum(), (a * a).sum(), (b * b).sum()
    denominator = (xx * yy).clamp_min(1e-30).sqrt()
    return (xy / denominator).clamp_min(0.0)


class NoPeekDefense(Defense):
    """Identity on the hidden states; ``extra_loss() = weight * dCor^2(E[tokens], sent)`` over real positions.

    Needs :meth:`observe_inputs` (with ``inputs_embeds``) before each forward; without it
    there is no penalty (a warning is logged once).

    Args:
        weight: the penalty weight ``lambda``.
        positions: at most this many real positions enter the penalty (drawn at random).
    """

    kind = "nopeek"

    def __init__(self, weight: float, positions: int = DEFAULT_POSITIONS) -> None:
        super().__init__()
        self.weight = check_finite_positive("nopeek weight", weight, allow_zero=True)
        if int(positions) < 4:
            raise ValueError(f"nopeek positions must be >= 4, got {positions}")
        self.positions = int(positions)
        self._inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self._loss: torch.Tensor | None = None
        self._warned = False

    @property
    def name(self) -> str:
        extra = f",positions={self.positions}" if self.positions != DEFAULT_POSITIONS else ""
        return f"nopeek:{format_number(self.weight)}{extra}"

    def observe_inputs(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
        pad_lengths: torch.Tensor | None = None,
        offset: int = 0,
    ) -> None:
        if inputs_embeds is None:
            self._inputs = None
            return
        self._inputs = (inputs_embeds.detach(), real_token_mask(input_ids, pad_lengths, offset))

    def forward(self, hidden: torch.Tensor, pad_lengths: torch.Tensor | None = None) -> torch.Tensor:
        inputs, self._inputs, self._loss = self._inputs, None, None
        if not torch.is_grad_enabled():
            return hidden
        if inputs is None:
            if not self._warned:
                logger.warning(
                    "nopeek saw no input embeddings (the client must call observe_inputs): no penalty"
                )
                self._warned = True
            return hidden
        embeds, real = inputs
        if embeds.shape[:2] != hidden.shape[:2]:
            raise ValueError(
                f"nopeek observed inputs of shape {tuple(embeds.shape[:2])} but got hidden states "
                f"{tuple(hidden.shape[:2])}: call observe_inputs with the same batch"
            )
        real = real.to(hidden.device)
        z, x = hidden[real], embeds.to(hidden.device)[real]
        if z.shape[0] > self.positions:
            keep = torch.randperm(z.shape[0], device=z.device)[: self.positions]
            z, x = z[keep], x[keep]
        if z.shape[0] >= 4:
            self._loss = self.weight * distance_correlation_sq(x, z)
        return hidden

    def extra_loss(self) -> torch.Tensor | None:
        """``weight * dCor^2`` from the last forward, or ``None`` (no grad, no inputs, fewer than 4 positions)."""
        return self._loss
