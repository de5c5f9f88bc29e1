"""One body pass for the training forwards of several clients, and its one backward.

client-batch training runs its rounds this way on the shared adapter; server-hierarchical
training batches the forwards that queue while the body worker is busy, each client's rows
going through its own replica (:meth:`AdapterPool.rows`).

Clients send sequences of different lengths. Since every row is left-padded, a shorter
client's rows just get more left padding (``pad_lengths`` grows by the difference), which
the mask rule already excludes, so each row sees exactly the keys it would see alone. The
output is cut back into each client's slice, and so is the gradient w.r.t. the input.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..session import BodySession
from .base import BodyHost

log = logging.getLogger(__name__)


@dataclass
class Slot:
    """One client's part of a joint pass: its rows and length inside the batch."""

    session: BodySession
    step_id: int
    rows: slice
    length: int


@dataclass
class Round:
    """A joint forward awaiting its backward (and, in client-batch, its optimiser step)."""

    number: int
    span: tuple[int, int]
    inputs: torch.Tensor | None
    outputs: torch.Tensor | None
    slots: dict[str, Slot]
    contributed: set[str] = field(default_factory=set)
    backwards: Any = None  # the Gather of the round's gradients
    steps: Any = None  # client-batch: the Gather of its optimiser steps
    retired: bool = False  # client-batch: closed by a later round before it finished


def leave(by_session: dict[str, Round], session: BodySession, what: str) -> None:
    """``session``'s stream ended while it had a place in a joint pass: forget it, and say so."""
    rnd = by_session.pop(session.id, None)
    if rnd is not None:
        log.warning("%s %d: %s left mid-round; the round goes on without it", what, rnd.number, session.id)


def joint_forward(
    host: BodyHost, number: int, span: tuple[int, int], members: dict, adapter: str | None
) -> tuple[Round, dict[str, torch.Tensor]]:
    """Run ``{sid: (session, step_id, hidden, pad)}`` as one batch; keep the graph in a Round.

    ``adapter``: the one adapter every row uses; None: each row uses its session's own.
    Runs on the body worker.
    """
    longest = max(item[2].shape[1] for item in members.values())
    hidden, pad, slots, names, row = [], [], {}, [], 0
    for sid, (session, step_id, h, p) in members.items():
        extra = longest - h.shape[1]
        hidden.append(F.pad(h, (0, 0, extra, 0)))
        pad.append(p.to(torch.long) + extra)
        slots[sid] = Slot(session, step_id, slice(row, row + h.shape[0]), h.shape[1])
        names += [session.adapter] * h.shape[0]
        row += h.shape[0]
    inputs = torch.cat(hidden).detach().requires_grad_()
    pool = host.pool
    if adapter is not None:
        pool.activate(adapter)
        outputs = host.body(inputs, torch.cat(pad), None, 0, span=span)
    else:
        with pool.rows(names):
            outputs = host.body(inputs, torch.cat(pad), None, 0, span=span)
    out = outputs.detach()
    results = {sid: out[s.rows, longest - s.length :] for sid, s in slots.items()}
    return Round(number, span, inputs, outputs, slots), results


def joint_backward(rnd: Round, items: dict[str, tuple[torch.Tensor, float]]) -> dict[str, torch.Tensor]:
    """One backward for ``{sid: (grad, share)}``; each client gets its input gradient.

    Client ``i``'s gradient enters the backward scaled by ``share_i`` and its input gradient
    is divided by it again (a zero share gets zeros). Rows of clients missing from ``items``
    get a zero gradient. Frees the round's graph. Runs on the body worker.
    """
    full = torch.zeros_like(rnd.outputs)
    for sid, (grad, share) in items.items():
        slot = rnd.slots[sid]
        full[slot.rows, full.shape[1] - slot.length :] = grad.to(full.dtype) * share
    rnd.outputs.backward(full)
    grad_in = rnd.inputs.grad
    rnd.inputs = rnd.outputs = None
    results = {}
    for sid, (_, share) in items.items():
        slot = rnd.slots[sid]
        part = grad_in[slot.rows, grad_in.shape[1] - slot.length :]
        results[sid] = part / share if share > 0 else torch.zeros_like(part)
    return results
