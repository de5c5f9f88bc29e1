"""``bypass``: the client cancels, in its own copy of the residual stream, what the chain added before sending.

A defence chain changes the head's output ``clean`` into ``sent`` (e.g. adds noise). The
body's decoder blocks are residual, so their output carries ``sent`` along:
``body_out = sent + f(sent)``. With ``bypass`` the client feeds its tail
``body_out - (sent - clean) = clean + f(sent)``: the server still sees only ``sent`` (and
the gradient), but the noise no longer travels through the residual stream into the
tail, which costs less utility. This changes nothing about what leaves the client, so
it changes no privacy guarantee.

``bypass`` is a flag item of the chain (``gaussian:0.5:relative+bypass``, always last):
the :class:`~fedsplit.privacy.base.Compose` holding it records ``sent - clean`` at each
forward (without grad) and returns it from ``residual_correction()``; the client
subtracts it from the body's output. For additive noise that constant is exact (the
chain's Jacobian is the identity); for a chain that transforms the states (sparsify,
MID, the adversarial adapter) the tail then reads ``clean + f(sent)``, and the head is
trained as if the correction were a constant.
"""

from __future__ import annotations

import torch

from fedsplit.privacy.base import Defense


class BypassDefense(Defense):
    """Flag item: identity on the hidden states; its :class:`Compose` records ``sent - clean``.

    On its own (the spec ``bypass`` alone) there is nothing to cancel and
    :meth:`residual_correction` stays ``None``.
    """

    kind = "bypass"
    bypass = True

    def forward(self, hidden: torch.Tensor, pad_lengths: torch.Tensor | None = None) -> torch.Tensor:
        return hidden
