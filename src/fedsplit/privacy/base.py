"""Base classes of the defence layer: :class:`Defense`, :class:`GradDefense`, :class:`Compose`.

A :class:`Defense` transforms the head's output hidden states ``[B, T, H]`` on the
client, right before they are sent to the server. It is an ``nn.Module`` so that
trainable defences (MID) carry parameters and follow ``.to(device)``, and so that the
client can backpropagate through it: noise is added as ``hidden + noise.detach()``
(identity Jacobian), deterministic transforms (clipping, masking, the MID
encoder/decoder) are differentiated by autograd as they are.

A :class:`GradDefense` transforms the gradient w.r.t. the body output before it is
sent back to the server. It only changes the copy that leaves the client.

Every defence here acts on each token vector independently (the MID KL term is the
only quantity that mixes tokens, as a mean). Randomness comes from torch's global
generator, so ``torch.manual_seed`` makes a defence reproducible.
"""

from __future__ import annotations

import logging
import math
from typing import ClassVar

import torch
from torch import nn

logger = logging.getLogger(__name__)


def format_number(value: float) -> str:
    """Shortest text that parses back to exactly ``value`` (used in canonical specs)."""
    return str(value) if isinstance(value, int) else repr(float(value))


def token_rms(hidden: torch.Tensor) -> torch.Tensor:
    """Root-mean-square of each token vector (over the last dim), shape ``[..., 1]``, without grad.

    Computed in float32 so that bf16/fp16 activations do not overflow the square.
    """
    with torch.no_grad():
        return hidden.detach().float().pow(2).mean(dim=-1, keepdim=True).sqrt().to(hidden.dtype)


class Defense(nn.Module):
    """Transforms hidden states before they leave the client.

    Subclasses implement :meth:`forward` and set ``kind`` (the spec keyword); ``name``
    is the canonical spec string, so ``parse_defense(d.name)`` rebuilds an equivalent
    defence.

    Defences apply in both training and eval mode: hidden states leave the client
    during generation too. Only MID behaves differently (it uses the posterior mean
    in eval mode).
    """

    kind: ClassVar[str] = "defense"

    @property
    def name(self) -> str:
        """Canonical spec of this defence, e.g. ``"gaussian:0.05:relative"``."""
        return self.kind

    def forward(self, hidden: torch.Tensor, pad_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Return the protected hidden states (same shape and dtype as ``hidden``).

        Args:
            hidden: hidden states ``[B, T, H]`` (any ``[..., H]`` works).
            pad_lengths: number of pad positions per row, ``LongTensor[B]``, or ``None``.
                The defences here treat every position alike (pad positions are
                masked downstream), so it is accepted for interface stability.
        """
        raise NotImplementedError

    def privacy_spent(
        self, steps: int, sample_rate: float = 1.0, delta: float = 1e-5
    ) -> tuple[float, float] | None:
        """``(epsilon, delta)`` after ``steps`` releases, or ``None`` if this is not a DP mechanism."""
        return None

    def extra_loss(self) -> torch.Tensor | None:
        """A term the client adds to its task loss (e.g. MID's KL), from the last forward; default ``None``."""
        return None

    def extra_repr(self) -> str:
        return self.name


class Compose(Defense):
    """Applies defences in order: ``Compose([a, b])(h) == b(a(h))``.

    Privacy: every defence here is a per-token map, so a DP member's guarantee
    survives whatever comes before it (its clipping bounds the sensitivity of any
    input) and after it (post-processing). The composed output is therefore as
    private as the most private DP member: :meth:`privacy_spent` returns the smallest
    epsilon among members that report one.
    """

    kind = "compose"

    def __init__(self, defenses: list[Defense]) -> None:
        super().__init__()
        if not defenses:
            raise ValueError("Compose needs at least one defence")
        flat: list[Defense] = []
        for d in defenses:
            flat.extend(d.defenses if isinstance(d, Compose) else [d])
        self.defenses = nn.ModuleList(flat)

    @property
    def name(self) -> str:
        return "+".join(d.name for d in self.defenses)

    def forward(self, hidden: torch.Tensor, pad_lengths: torch.Tensor | None = None) -> torch.Tensor:
        for d in self.defenses:
            hidden = d(hidden, pad_lengths)
        return hidden

    def privacy_spent(
        self, steps: int, sample_rate: float = 1.0, delta: float = 1e-5
    ) -> tuple[float, float] | None:
        spent = [s for d in self.defenses if (s := d.privacy_spent(steps, sample_rate, delta)) is not None]
        if not spent:
            return None
        return min(spent, key=lambda s: s[0])

    def extra_loss(self) -> torch.Tensor | None:
        losses = [loss for d in self.defenses if (loss := d.extra_loss()) is not None]
        if not losses:
            return None
        return torch.stack([loss.reshape(()) for loss in losses]).sum()

    def extra_repr(self) -> str:
        return ""


class GradDefense:
    """Transforms the gradient w.r.t. the body output before it is sent to the server.

    Returns a new tensor; the argument is never modified, so the client's own clean
    backward into head and tail is unaffected.
    """

    kind: ClassVar[str] = "grad"

    @property
    def name(self) -> str:
        """Canonical spec of this gradient defence, e.g. ``"gaussian:0.01"``."""
        return self.kind

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


def check_finite_positive(what: str, value: float, allow_zero: bool = False) -> float:
    """Validate a numeric parameter; raise ``ValueError`` with a readable message."""
    value = float(value)
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{what} must be a finite number {bound}, got {value}")
    return value
