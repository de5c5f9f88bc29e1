"""Base classes of the defence layer: :class:`Defense`, :class:`GradDefense`, :class:`Compose`.

A :class:`Defense` transforms the head's output hidden states ``[B, T, H]`` on the
client, right before they are sent to the server. It is an ``nn.Module`` so that
trainable defences (MID) carry parameters and follow ``.to(device)``, and so that the
client can backpropagate through it: noise is added as ``hidden + noise.detach()``
(identity Jacobian), deterministic transforms (clipping, masking, the MID
encoder/decoder) are differentiated by autograd as they are.

A :class:`GradDefense` transforms the gradient w.r.t. the body output before it is
sent back to the server. It only changes the copy that leaves the client.

Three optional hooks let a defence see more than the hidden states; the client calls
them on every defence (a :class:`Compose` passes them to its members), and their
defaults do nothing, so a defence that does not need them ignores them:

- :meth:`Defense.observe_inputs` is called right before the head runs, with the token
  ids and their input embeddings; defences that learn against the input (NoPeek's
  distance correlation, the adversarial inverter) keep them for the next forward.
- :attr:`Defense.token_defense` is a :class:`TokenDefense` that the client applies to
  the token ids *before* the head (text-level perturbation), or ``None``.
- :meth:`Defense.residual_correction` is what the client subtracts from the body's
  output before its tail reads it (``bypass``), or ``None``.

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
    # True only for ``bypass``: a :class:`Compose` holding it records ``sent - clean``.
    bypass: ClassVar[bool] = False

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

    def observe_inputs(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
        pad_lengths: torch.Tensor | None = None,
        offset: int = 0,
    ) -> None:
        """See the head's input of the forward that comes next; default: ignore it.

        The client calls this right before the head, with what the head reads: the token
        ids ``[B, T]`` (after any :attr:`token_defense`), their input embeddings
        ``[B, T, E]`` (the embedding lookup, before any model-specific scaling) and the pad
        lengths. ``offset`` is the number of positions already in the head's cache (a
        decoding step), so position ``t`` is a pad iff ``offset + t < pad_lengths[b]``.
        """

    @property
    def token_defense(self) -> TokenDefense | None:
        """The :class:`TokenDefense` the client applies to token ids before the head, or ``None``."""
        return None

    def residual_correction(self) -> torch.Tensor | None:
        """What the client subtracts from the body's output before its tail (``bypass``); default ``None``.

        From the last forward, shaped like the hidden states it sent, without grad.
        """
        return None

    def extra_repr(self) -> str:
        return self.name


class TokenDefense(Defense):
    """A defence on the token ids, applied by the client before the head (text-level perturbation).

    It sits in a defence chain like any other (its spec is an item of the chain, and it
    must come first), is the identity on hidden states, and exposes itself as
    :attr:`token_defense`; the client calls :meth:`perturb` on the ids it feeds the head.
    """

    kind: ClassVar[str] = "token"

    def forward(self, hidden: torch.Tensor, pad_lengths: torch.Tensor | None = None) -> torch.Tensor:
        return hidden

    @property
    def token_defense(self) -> TokenDefense:
        return self

    def perturb(
        self, input_ids: torch.Tensor, pad_lengths: torch.Tensor | None = None, offset: int = 0
    ) -> torch.Tensor:
        """Return new ids ``[B, T]`` (a new tensor; pad positions and protected ids unchanged)."""
        raise NotImplementedError


def real_token_mask(
    input_ids: torch.Tensor, pad_lengths: torch.Tensor | None = None, offset: int = 0
) -> torch.Tensor:
    """Bool ``[B, T]``: True at real (non-pad) positions of left-padded ``input_ids``.

    ``offset`` is the number of positions before ``input_ids`` (a decoding step after a
    prefill), so position ``t`` of row ``b`` is a pad iff ``offset + t < pad_lengths[b]``.
    """
    batch, length = input_ids.shape[:2]
    if pad_lengths is None:
        return torch.ones(batch, length, dtype=torch.bool, device=input_ids.device)
    positions = torch.arange(length, device=input_ids.device) + int(offset)
    return positions.unsqueeze(0) >= pad_lengths.to(input_ids.device).view(-1, 1)


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
        if sum(d.token_defense is not None for d in flat) > 1:
            raise ValueError("a defence chain can hold only one token-level defence")
        self.defenses = nn.ModuleList(flat)
        self._correction: torch.Tensor | None = None
        self._reference: torch.Tensor | None = None

    @property
    def name(self) -> str:
        return "+".join(d.name for d in self.defenses)

    @property
    def bypasses(self) -> bool:
        """Whether the chain holds ``bypass`` (the client cancels what the chain sent)."""
        return any(d.bypass for d in self.defenses)

    def set_reference(self, clean: torch.Tensor) -> None:
        """The head's output on the *true* ids, for the next forward's bypass correction.

        With a text-level defence the head read perturbed ids, so its output already carries
        the perturbation. The client runs its head once more on the true ids and hands that
        output here: ``bypass`` then cancels the text perturbation too, and the tail reads the
        true text's residual stream plus what the body computed from the perturbed one.
        """
        self._reference = clean.detach()

    def forward(self, hidden: torch.Tensor, pad_lengths: torch.Tensor | None = None) -> torch.Tensor:
        clean, self._reference = (self._reference, None) if self._reference is not None else (hidden, None)
        if clean.shape != hidden.shape:
            raise ValueError(
                f"bypass reference of shape {tuple(clean.shape)} for states {tuple(hidden.shape)}"
            )
        for d in self.defenses:
            hidden = d(hidden, pad_lengths)
        # A bypass member cancels, on the client, everything the chain did to the residual stream.
        self._correction = (hidden - clean).detach() if self.bypasses else None
        return hidden

    def observe_inputs(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
        pad_lengths: torch.Tensor | None = None,
        offset: int = 0,
    ) -> None:
        for d in self.defenses:
            d.observe_inputs(input_ids, inputs_embeds, pad_lengths, offset)

    @property
    def token_defense(self) -> TokenDefense | None:
        return next((t for d in self.defenses if (t := d.token_defense) is not None), None)

    def residual_correction(self) -> torch.Tensor | None:
        """``sent - clean`` of the last forward when the chain holds ``bypass``, else ``None``."""
        return self._correction

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
