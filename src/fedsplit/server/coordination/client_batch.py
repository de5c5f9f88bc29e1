"""``client-batch`` training: one body forward, one backward and one optimiser step per round.

The forwards of the clients in a round (every attached client, or those that arrived
within the round timeout) are concatenated into one batch (:mod:`.joint`).

The gradients of the round are gathered the same way and run as one backward. Each
client's loss is a mean over its own target tokens; to give the body the update of *one*
client holding the union of the batches (a mean over all target tokens), client ``i``'s
gradient is weighted by ``n_i / sum(n)``, where ``n_i`` is the ``loss_weight`` it sends
with its ``Backward`` (its number of target tokens; 1 if absent). The gradient returned
to each client is divided by its weight again, so its head learns from its own loss as
in any other mode. A client whose gradient does not arrive in time contributes nothing.
"""

from __future__ import annotations

import logging

import torch

from ..session import BodySession, SessionError, warm_up
from .base import SHARED_ADAPTER, BodyHost, SharedAdapter
from .joint import Round, joint_backward, joint_forward, leave
from .rounds import Gather

log = logging.getLogger(__name__)


class ClientBatch(SharedAdapter):
    """Gathers the round's forwards, backwards and steps; runs each once for all clients."""

    mode = "client-batch"

    def __init__(self, host: BodyHost) -> None:
        super().__init__(host)
        self.forwards = Gather(
            "client-batch forward", self.timeout, self.waiting_for_forward, self._forward_round
        )
        self.rounds = 0
        self.by_session: dict[str, Round] = {}  # awaiting backward or step
        self._open: dict[int, Round] = {}
        self.rows = 0
        self.members = 0  # clients summed over the rounds: members / rounds = clients per round
        self.updates = 0  # optimiser steps of the shared body adapter

    def waiting_for_forward(self) -> set[str]:
        """Clients expected in the next forward round: every attached client.

        A client still inside a round is expected too: it sends its next forward once its round's
        optimiser step is done. Rounds are lock-step: a new round's forward must not run while an
        earlier round awaits its backward, whose graph that round's optimiser step would invalidate
        (a client that attaches mid-round waits for the next round).
        """
        return self.shared_ids()

    def poke(self) -> None:
        super().poke()
        self.forwards.poke()
        for rnd in list(self._open.values()):
            for gather in (rnd.backwards, rnd.steps):
                if gather is not None:
                    gather.poke()

    def reset(self) -> None:
        if self.rounds:
            log.info(
                "client-batch: %d round(s) of %.1f client(s) on average, %d body update(s), "
                "%d forward round(s) that timed out",
                self.rounds,
                self.members / self.rounds,
                self.updates,
                self.forwards.timeouts,
            )
        super().reset()
        self.rounds = self.members = self.updates = self.rows = 0  # the next federation counts afresh
        self.by_session.clear()
        self._open.clear()
        self.forwards = Gather(
            "client-batch forward", self.timeout, self.waiting_for_forward, self._forward_round
        )

    def detach(self, session: BodySession) -> None:
        leave(self.by_session, session, "client-batch round")
        super().detach(session)

    # ------------------------------------------------------------------ forward

    async def forward(self, session, step_id, hidden, pad, offset):
        if not self.shared(session):
            return await super().forward(session, step_id, hidden, pad, offset)
        session.check_inputs(hidden, pad, offset)
        if offset != 0:
            raise SessionError(
                "INVALID_ARGUMENT", "client-batch training runs whole sequences: position_offset must be 0"
            )
        if session.id in self.by_session:
            raise SessionError(
                "FAILED_PRECONDITION",
                "client-batch: finish the pending step (backward, then optimizer step) first",
            )
        return await self.forwards.submit(session.id, (session, step_id, hidden, pad))

    async def _retire_open_rounds(self) -> None:
        """Close the rounds still open when a new one starts (after the round timeout, or abandoned).

        Their clients' pending and later backwards and steps are answered with an error (send the
        forward again), the retired round never steps, and any gradient its backward accumulated is
        cleared before the new round's forward runs on the body worker.
        """
        if not self._open:
            return
        for number, rnd in sorted(self._open.items()):
            waiting = sorted(sid for sid in rnd.slots if self.by_session.get(sid) is rnd)
            if waiting:
                log.warning(
                    "client-batch round %d: still open after the round timeout; closed without %s "
                    "(they must send the forward again)",
                    number,
                    ", ".join(waiting),
                )
            rnd.retired = True  # its graph is freed with the Round (or by a backward already under way)
            for sid in waiting:
                del self.by_session[sid]
            for gather in (rnd.backwards, rnd.steps):
                if gather is not None:
                    gather.poke()  # nobody is expected any more: pending requests get their error now
        self._open.clear()
        await self.host.run(self.zero_grad)

    @staticmethod
    def _closed(rnd: Round, items: dict) -> dict:
        error = SessionError(
            "NOT_FOUND",
            f"client-batch round {rnd.number} was closed after the round timeout without this client; "
            "send the forward again",
        )
        return {sid: error for sid in items}

    async def _forward_round(self, items: dict) -> dict:
        await self._retire_open_rounds()
        groups: dict[tuple[int, int], dict] = {}
        for sid, item in items.items():
            groups.setdefault(tuple(item[0].config.span), {})[sid] = item
        results: dict = {}
        for span, members in groups.items():
            self.rounds += 1
            rnd, outs = await self.host.run(self._joint_forward, self.rounds, span, members)
            self._open[rnd.number] = rnd
            rnd.backwards = Gather(
                f"client-batch backward {rnd.number}",
                self.timeout,
                lambda r=rnd: self._members(r, r.slots),
                lambda it, r=rnd: self._backward_round(r, it),
            )
            for sid in members:
                self.by_session[sid] = rnd
            results.update(outs)
        return results

    def _joint_forward(self, number: int, span: tuple[int, int], members: dict):
        rnd, results = joint_forward(self.host, number, span, members, SHARED_ADAPTER)
        rows = sum(s.rows.stop - s.rows.start for s in rnd.slots.values())
        self.rows += rows
        self.members += len(members)
        log.debug("client-batch round %d: %d client(s), %d rows", number, len(members), rows)
        return rnd, results

    def _members(self, rnd: Round, among) -> set[str]:
        return {sid for sid in among if sid in self.attached and self.by_session.get(sid) is rnd}

    # ------------------------------------------------------------------ backward

    async def backward(self, session, step_id, grad, weight=None):
        rnd = self.by_session.get(session.id)
        if not self.shared(session):
            return await super().backward(session, step_id, grad, weight)
        if rnd is None or rnd.backwards is None or rnd.slots[session.id].step_id != step_id:
            raise SessionError(
                "NOT_FOUND",
                f"no pending forward for step {step_id} (never sent, already used, or "
                "its client-batch round closed without this client)",
            )
        slot = rnd.slots[session.id]
        expected = (slot.rows.stop - slot.rows.start, slot.length, session.hidden_size)
        if tuple(grad.shape) != expected:
            raise SessionError(
                "INVALID_ARGUMENT", f"grad has shape {list(grad.shape)}, expected {list(expected)}"
            )
        weight = 1.0 if weight is None else float(weight)
        if not weight >= 0:
            raise SessionError("INVALID_ARGUMENT", f"loss_weight must be >= 0, got {weight}")
        return await rnd.backwards.submit(session.id, (grad, weight))

    async def _backward_round(self, rnd: Round, items: dict) -> dict:
        if rnd.retired:
            return self._closed(rnd, items)
        for sid in set(rnd.slots) - set(items):
            if self.by_session.get(sid) is rnd:
                del self.by_session[sid]  # its gradient is lost; its next forward joins a new round
        rnd.contributed = set(items)
        rnd.steps = Gather(
            f"client-batch step {rnd.number}",
            self.timeout,
            lambda r=rnd: self._members(r, r.contributed),
            lambda it, r=rnd: self._step_round(r, it),
        )
        try:
            return await self.host.run(self._joint_backward, rnd, items)
        except Exception:
            for sid in items:
                self.by_session.pop(sid, None)
            self._open.pop(rnd.number, None)
            raise

    @staticmethod
    def _joint_backward(rnd: Round, items: dict) -> dict:
        total = sum(w for _, w in items.values())
        shares = {sid: w / total if total > 0 else 1.0 / len(items) for sid, (_, w) in items.items()}
        return joint_backward(rnd, {sid: (grad, shares[sid]) for sid, (grad, _) in items.items()})

    # ------------------------------------------------------------------ optimiser step

    async def step(self, session, clip):
        rnd = self.by_session.get(session.id)
        if not self.shared(session):
            return await super().step(session, clip)
        if rnd is None or rnd.steps is None:
            log.warning("client-batch: %s sent a step outside any round; nothing to apply", session.id)
            return
        await rnd.steps.submit(session.id, clip)

    async def _step_round(self, rnd: Round, items: dict) -> dict:
        if rnd.retired:
            return self._closed(rnd, items)
        clip = max(items.values(), default=0.0)
        try:
            await self.host.run(self._apply, clip)
        finally:
            for sid in rnd.slots:
                if self.by_session.get(sid) is rnd:
                    del self.by_session[sid]
            self._open.pop(rnd.number, None)
            self.forwards.poke()
        for sid in items:
            session = rnd.slots[sid].session
            session.steps += 1
        return {sid: None for sid in items}

    def _apply(self, clip: float) -> None:
        if self.optimizer is None:
            return
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(self.host.pool.parameters(SHARED_ADAPTER), clip)
        warm_up(self.optimizer, *self.schedule)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
