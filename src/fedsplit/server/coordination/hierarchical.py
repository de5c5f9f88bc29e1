"""``server-hierarchical`` training: one body replica per client, FedAvg every ``sync_every`` steps.

Every client trains its own LoRA replica of the body on the shared frozen base weights and
proceeds at its own pace; no client waits for another except at a sync. The body worker
still batches: the forwards that queue while it is busy run as *one* pass in which each
client's rows go through that client's replica (:meth:`AdapterPool.rows`), so eight replicas
cost about one batched body pass, not eight small ones (measured on SmolLM2: 3.6 s for one
pass of eight replicas vs 4.8 s for eight separate passes, forward + backward). A forward
that finds the worker idle waits up to ``gather_ms`` for the clients whose next request is a
forward (attached, no forward awaiting its backward), then the pass runs with whoever is
there; 0 runs it at once. A client alone in its pass uses the session's own graph. The
pass's backward runs once the gradients of its clients are in (or after the round timeout,
without a silent one); each replica receives the gradient of its own rows only, exactly what
it would get alone. Optimiser steps stay per replica.

Every ``sync_every`` local steps the clients meet at a barrier and the server writes the
example-weighted average of their replicas into each of them (each layer averaged over
the replicas whose span trains it); head/tail FedAvg rounds run at the same steps.
"""

from __future__ import annotations

import logging

from ..batching import WorkerBatcher
from ..session import BodySession, SessionError
from .base import BodyHost, Coordinator
from .fedavg import restrict, weighted_average
from .joint import Round, joint_backward, joint_forward, leave
from .rounds import Gather

log = logging.getLogger(__name__)


class ServerHierarchical(Coordinator):
    """A body replica per client; batched replica passes; FedAvg of the replicas every ``sync_every`` steps."""

    mode = "server-hierarchical"

    def __init__(self, host: BodyHost) -> None:
        super().__init__(host)  # fedavg_every follows sync_every here (ServerConfig.fedavg_period)
        self.local_steps: dict[str, int] = {}
        self.examples: dict[str, int] = {}
        self.barriers: dict[int, Gather] = {}
        self.last_round = 0
        self.syncs = 0
        linger = float(host.config.gather_ms) / 1000
        self.forwards = WorkerBatcher(host.run, self._forward_batch, linger, self._expected_forwards)
        self.passes = 0  # joint replica passes run
        self.joint_rows = 0
        self.joint_clients = 0
        self.alone = 0  # forwards that ran alone
        self.queued: set[str] = set()  # sessions whose forward waits for the worker
        self.by_session: dict[str, Round] = {}  # in a joint pass awaiting its backward
        self._open: dict[int, Round] = {}

    def _expected_forwards(self) -> int:
        """Clients whose next request is a forward: attached, with no forward awaiting its backward."""
        return sum(1 for sid, s in self.attached.items() if sid not in self.by_session and not s.graphs)

    def poke(self) -> None:
        super().poke()
        self.forwards.poke()
        for gather in list(self.barriers.values()):
            gather.poke()
        for rnd in list(self._open.values()):
            if rnd.backwards is not None:
                rnd.backwards.poke()

    def detach(self, session: BodySession) -> None:
        leave(self.by_session, session, "server-hierarchical pass")
        super().detach(session)
        self.local_steps.pop(session.id, None)
        self.examples.pop(session.id, None)

    def reset(self) -> None:
        super().reset()
        self.barriers.clear()
        self.local_steps.clear()
        self.examples.clear()
        self.by_session.clear()
        self._open.clear()
        self.last_round = 0

    # ------------------------------------------------------------------ forward and backward

    async def forward(self, session, step_id, hidden, pad, offset):
        if session.config.mode != "train" or session.adapter is None:
            return await super().forward(session, step_id, hidden, pad, offset)
        session.check_inputs(hidden, pad, offset)
        if offset != 0:
            raise SessionError(
                "INVALID_ARGUMENT",
                "server-hierarchical training runs whole sequences: position_offset must be 0",
            )
        if session.id in self.queued or session.id in self.by_session:
            raise SessionError(
                "FAILED_PRECONDITION",
                "server-hierarchical: finish the pending step (backward, then optimizer step) first",
            )
        self.queued.add(session.id)
        try:
            rnd, out = await self.forwards.submit(session, step_id, hidden, pad)
        finally:
            self.queued.discard(session.id)
        if rnd is not None:
            self.by_session[session.id] = rnd
            if rnd.backwards is None:  # the first of the pass's clients back on the event loop
                self._open[rnd.number] = rnd
                rnd.backwards = Gather(
                    f"server-hierarchical backward {rnd.number}",
                    self.timeout,
                    lambda r=rnd: {sid for sid in r.slots if sid in self.attached},
                    lambda items, r=rnd: self._backward_round(r, items),
                )
        self.examples[session.id] = self.examples.get(session.id, 0) + int(hidden.shape[0])
        return out

    def _forward_batch(self, items: list) -> list:
        """On the body worker: one pass per span for the queued forwards; a lone one on its session."""
        results: list = [None] * len(items)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (session, *_rest) in enumerate(items):
            groups.setdefault(tuple(session.config.span), []).append(index)
        for span, indices in groups.items():
            try:
                if len(indices) == 1:
                    session, step_id, hidden, pad = items[indices[0]]
                    results[indices[0]] = (None, session.forward(step_id, hidden, pad, 0))
                    self.alone += 1
                    continue
                self.passes += 1
                self.joint_clients += len(indices)
                members = {items[i][0].id: items[i] for i in indices}
                rnd, outs = joint_forward(self.host, self.passes, span, members, adapter=None)
                self.joint_rows += sum(s.rows.stop - s.rows.start for s in rnd.slots.values())
                for i in indices:
                    results[i] = (rnd, outs[items[i][0].id])
            except Exception as exc:  # noqa: BLE001 - reported to the clients of this group
                for i in indices:
                    results[i] = exc
        return results

    async def backward(self, session, step_id, grad, weight=None):
        rnd = self.by_session.get(session.id)
        if rnd is None:  # its forward ran alone, on the session's own graph
            return await super().backward(session, step_id, grad, weight)
        slot = rnd.slots[session.id]
        if slot.step_id != step_id:
            raise SessionError(
                "NOT_FOUND", f"no pending forward for step {step_id}; the pending one is {slot.step_id}"
            )
        expected = (slot.rows.stop - slot.rows.start, slot.length, session.hidden_size)
        if tuple(grad.shape) != expected:
            raise SessionError(
                "INVALID_ARGUMENT", f"grad has shape {list(grad.shape)}, expected {list(expected)}"
            )
        return await rnd.backwards.submit(session.id, grad)

    async def _backward_round(self, rnd: Round, items: dict) -> dict:
        for sid in rnd.slots:
            if self.by_session.get(sid) is rnd:
                del self.by_session[sid]  # a client missing here lost this step's gradient
        self._open.pop(rnd.number, None)
        # Replicas share no weights: every client's gradient enters unscaled.
        return await self.host.run(joint_backward, rnd, {sid: (grad, 1.0) for sid, grad in items.items()})

    # ------------------------------------------------------------------ optimiser step and sync

    async def step(self, session, clip):
        await super().step(session, clip)
        if not self.sync_every or session.id not in self.attached:
            return
        n = self.local_steps[session.id] = self.local_steps.get(session.id, 0) + 1
        if n % self.sync_every == 0:
            await self._sync(session, n // self.sync_every)

    async def _sync(self, session: BodySession, rnd: int) -> None:
        if rnd <= self.last_round:
            log.warning(
                "body sync round %d already closed; %s continues with its own replica", rnd, session.id
            )
            return
        gather = self.barriers.get(rnd)
        if gather is None:
            gather = self.barriers[rnd] = Gather(
                f"body sync round {rnd}",
                self.timeout,
                lambda: set(self.attached),
                lambda items, r=rnd: self._average(r, items),
            )
        await gather.submit(session.id, session)

    async def _average(self, rnd: int, members: dict[str, BodySession]) -> dict:
        self.barriers.pop(rnd, None)
        self.last_round = max(self.last_round, rnd)
        weights = {sid: self.examples.get(sid, 0) for sid in members}
        await self.host.run(average_replicas, self.host.pool, list(members.values()), list(weights.values()))
        for sid in members:
            self.examples[sid] = 0
        self.syncs += 1
        log.info(
            "body sync round %d: averaged %d replica(s), %d examples; so far %d joint pass(es) of %.1f "
            "clients on average, %d forward(s) alone",
            rnd,
            len(members),
            sum(weights.values()),
            self.passes,
            self.joint_clients / max(1, self.passes),
            self.alone,
        )
        return {sid: None for sid in members}


def average_replicas(pool, sessions: list[BodySession], weights: list[float]) -> None:
    """FedAvg of the sessions' body adapters, each layer over the replicas whose span trains it."""
    states = [restrict(pool.state_dict(s.adapter), s.config.span) for s in sessions]
    mean = weighted_average(states, weights)
    for session in sessions:
        pool.load_state_dict(session.adapter, mean)
