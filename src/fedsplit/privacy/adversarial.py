"""Adversarial training against a simulated inverter, through a gradient-reversal layer.

The "AT" defence of VFLAIR-LLM (arXiv 2508.03097), in our own implementation: the client
trains, alongside its task, a small *privacy adapter* on the states it sends and a
*simulated inverter* that tries to read the input tokens back from them. The two play a
min-max game in a single backward, as in domain-adversarial training (Ganin &
Lempitsky, ICML 2015): the inverter reads the states through a gradient-reversal layer
(identity forward, ``-lambda x`` gradient backward), and the client adds
``extra_loss() = CE(inverter(GRL_lambda(sent)), input_ids)`` to its task loss. So:

- the inverter's parameters get the ordinary gradient of the CE: it learns to invert;
- the adapter, the head (and anything before) get ``-lambda`` times the gradient of the
  CE w.r.t. the sent states: they learn to make inversion harder, while the task loss
  keeps them useful.

The adapter is a residual low-rank MLP ``h + up(gelu(down(h)))`` with ``up`` initialised
to zero, so a fresh defence sends exactly what the head computed. The inverter is a
per-position linear classifier (after a parameter-free LayerNorm, which removes the
large norm differences between positions) over a *hashed* vocabulary: token ``i`` is
class ``i mod buckets``, which keeps its size independent of the model's vocabulary.
Optional noise (``noise=S``: Gaussian, ``S`` times each token's RMS) is added after
the adapter, so the inverter trains on what the server receives.

The inverter plays the server's part only approximately (it is linear, sees one batch
at a time, and learns at the client's learning rate); measure the result with the
attacks of ``fedsplit.attacks``. No formal guarantee: :meth:`privacy_spent` is ``None``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from fedsplit.privacy.base import Defense, check_finite_positive, format_number, real_token_mask, token_rms

logger = logging.getLogger(__name__)

DEFAULTS = {"rank": 64, "buckets": 4096, "noise": 0.0, "warmup": 0, "positions": 1024}


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``-scale`` in the backward pass."""
    return _GradientReversal.apply(x, float(scale))


class AdversarialDefense(Defense):
    """Privacy adapter + simulated inverter trained min-max through gradient reversal.

    Needs :meth:`observe_inputs` (the token ids) before each forward; without it there is
    no adversarial term (a warning is logged once) and only the adapter (and noise) apply.

    Args:
        hidden_size: size ``H`` of the hidden states.
        weight: ``lambda``, the scale of the reversed gradient that reaches the adapter and head.
        rank: inner size of the adapter (capped at ``H``).
        buckets: classes of the inverter (token ids hashed as ``id mod buckets``).
        noise: std of Gaussian noise after the adapter, relative to each token's RMS (0: none).
        warmup: ``lambda`` grows linearly from ``lambda / warmup`` to ``lambda`` over the
            first ``warmup`` training forwards (the inverter first learns something to fight).
        positions: at most this many real positions per batch train the inverter (drawn at random).
    """

    kind = "adv"

    def __init__(
        self,
        hidden_size: int,
        weight: float,
        rank: int = DEFAULTS["rank"],
        buckets: int = DEFAULTS["buckets"],
        noise: float = DEFAULTS["noise"],
        warmup: int = DEFAULTS["warmup"],
        positions: int = DEFAULTS["positions"],
    ) -> None:
        super().__init__()
        if hidden_size < 1 or rank < 1 or buckets < 2 or positions < 1 or warmup < 0:
            raise ValueError(
                "adv needs hidden_size >= 1, rank >= 1, buckets >= 2, positions >= 1 and warmup >= 0, got "
                f"{hidden_size}, {rank}, {buckets}, {positions}, {warmup}"
            )
        self.hidden_size = int(hidden_size)
        self.weight = check_finite_positive("adv weight", weight, allow_zero=True)
        self.rank, self.buckets = int(rank), int(buckets)
        self.noise = check_finite_positive("adv noise", noise, allow_zero=True)
        self.warmup, self.positions = int(warmup), int(positions)
        inner = min(self.rank, self.hidden_size)
        self.adapter_down = nn.Linear(self.hidden_size, inner, bias=False)
        self.adapter_up = nn.Linear(inner, self.hidden_size, bias=False)
        nn.init.zeros_(self.adapter_up.weight)
        self.inverter = nn.Sequential(
            nn.LayerNorm(self.hidden_size, elementwise_affine=False),
            nn.Linear(self.hidden_size, self.buckets),
        )
        # Training forwards seen, for the warm-up; a buffer so that checkpoints keep it.
        self.register_buffer("forwards", torch.zeros((), dtype=torch.long))
        self._ids: tuple[torch.Tensor, torch.Tensor] | None = None
        self._loss: torch.Tensor | None = None
        self._warned = False

    @property
    def name(self) -> str:
        values = {"rank": self.rank, "buckets": self.buckets, "noise": self.noise}
        values |= {"warmup": self.warmup, "positions": self.positions}
        extra = "".join(f",{k}={format_number(v)}" for k, v in values.items() if v != DEFAULTS[k])
        return f"adv:{format_number(self.weight)}{extra}"

    def current_weight(self) -> float:
        """``lambda`` for the next training forward (after the warm-up, ``weight``)."""
        if self.warmup == 0:
            return self.weight
        return self.weight * min(1.0, (int(self.forwards) + 1) / self.warmup)

    def observe_inputs(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
        pad_lengths: torch.Tensor | None = None,
        offset: int = 0,
    ) -> None:
        self._ids = (input_ids.detach(), real_token_mask(input_ids, pad_lengths, offset))

    def adapt(self, hidden: torch.Tensor) -> torch.Tensor:
        """The adapter (and noise) alone: what is sent, in the adapter's dtype."""
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"adv was built for hidden size {self.hidden_size}, got {hidden.shape[-1]}")
        x = hidden.to(self.adapter_down.weight.dtype)
        out = x + self.adapter_up(F.gelu(self.adapter_down(x)))
        if self.noise > 0:
            with torch.no_grad():
                noise = torch.randn_like(out) * self.noise * token_rms(out)
            out = out + noise.detach()
        return out

    def forward(self, hidden: torch.Tensor, pad_lengths: torch.Tensor | None = None) -> torch.Tensor:
        out = self.adapt(hidden)
        observed, self._ids, self._loss = self._ids, None, None
        if torch.is_grad_enabled():
            if observed is None:
                if not self._warned:
                    logger.warning("adv saw no input ids (the client must call observe_inputs): no inverter")
                    self._warned = True
            else:
                ids, real = observed
                self._loss = self.inversion_loss(out, ids, real, self.current_weight())
                if self.training:
                    self.forwards += 1
        return out.to(hidden.dtype)

    def inversion_loss(
        self,
        sent: torch.Tensor,
        input_ids: torch.Tensor,
        real: torch.Tensor | None = None,
        scale: float = 1.0,
    ) -> torch.Tensor | None:
        """The inverter's cross-entropy on ``sent [B, T, H]`` against ``input_ids`` hashed to buckets.

        Over the positions where ``real [B, T]`` is True (all if ``None``), at most
        ``positions`` of them; the states are read through ``grad_reverse(., scale)``.
        ``None`` if there is no real position.
        """
        if input_ids.shape[:2] != sent.shape[:2]:
            raise ValueError(
                f"adv observed ids of shape {tuple(input_ids.shape[:2])} but got hidden states "
                f"{tuple(sent.shape[:2])}: call observe_inputs with the same batch"
            )
        if real is None:
            real = torch.ones(sent.shape[:2], dtype=torch.bool)
        real = real.to(sent.device)
        states, targets = sent[real], input_ids.to(sent.device)[real] % self.buckets
        if states.shape[0] == 0:
            return None
        if states.shape[0] > self.positions:
            keep = torch.randperm(states.shape[0], device=states.device)[: self.positions]
            states, targets = states[keep], targets[keep]
        logits = self.inverter(grad_reverse(states.to(self.adapter_down.weight.dtype), scale))
        return F.cross_entropy(logits.float(), targets)

    def extra_loss(self) -> torch.Tensor | None:
        """The inverter's cross-entropy from the last forward (``None`` without grad or observed ids)."""
        return self._loss
