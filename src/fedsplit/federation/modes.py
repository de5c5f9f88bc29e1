"""How the server trains the body for many clients (``fedsplit serve --mode``).

``independent``
    Every training session has its own body adapter and optimiser and nothing is
    coordinated (one client, or clients that do not federate). The default.
``sequential``
    One body adapter and one AdamW shared by all clients, one client step at a time —
    classic split learning with many clients, and the baseline of the others.
``client-batch``
    The shared adapter again, but the forwards of a round are gathered and run as one
    batch, the gradients as one backward, then one optimiser step
    (:mod:`fedsplit.federation.client_batch`).
``server-hierarchical``
    One body replica per client on the shared frozen base weights; clients proceed
    independently and concurrently; every ``sync_every`` steps the server averages the
    replicas (FedAvg weighted by the examples each trained on since the last sync)
    (:mod:`fedsplit.federation.hierarchical`).

In every mode the server also runs head/tail FedAvg rounds (the ``Adapters`` RPC); it
tells clients how often to join them in ``InfoReply.fedavg_every``.

The servicer calls a coordinator for each training forward, backward and step, and
tells it when a session's stream attaches and detaches. Generation is never coordinated.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import torch

from ..server.session import BodySession, SessionConfig
from ..wire import fedsplit_pb2 as pb
from .rounds import HeadTailRounds

log = logging.getLogger(__name__)

MODES = ("independent", "sequential", "client-batch", "server-hierarchical")
SHARED_ADAPTER = "federation"
PROTO_MODES = {
    "independent": pb.FEDERATION_MODE_UNSPECIFIED,
    "sequential": pb.SEQUENTIAL,
    "client-batch": pb.CLIENT_BATCH,
    "server-hierarchical": pb.SERVER_HIERARCHICAL,
}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown training mode {mode!r}; choose one of: {', '.join(MODES)}")
    return mode


class Coordinator:
    """``independent``: each training session trains its own body adapter; nothing is coordinated."""

    mode = "independent"

    def __init__(self, servicer) -> None:
        self.servicer = servicer
        config = servicer.config
        self.timeout = float(getattr(config, "round_timeout", 30.0))
        self.sync_every = int(getattr(config, "sync_every", 0))
        self.fedavg_every = int(getattr(config, "fedavg_every", 0))
        self.attached: dict[str, BodySession] = {}
        self.head_tail = self._new_rounds()

    def _new_rounds(self) -> HeadTailRounds:
        config = self.servicer.config
        return HeadTailRounds(self.timeout, lambda: len(self.attached), config.max_message_bytes)

    # ------------------------------------------------------------------ session life cycle

    def prepare(self, config: SessionConfig) -> SessionConfig:
        """Adjust a session's config before the session is created (e.g. share an adapter)."""
        return config

    def attach(self, session: BodySession) -> None:
        if session.config.mode == "train":
            self.attached[session.id] = session

    def detach(self, session: BodySession) -> None:
        """The session's stream ended (closed or broken): nobody waits for it any more."""
        if self.attached.pop(session.id, None) is not None:
            self.poke()
            if not any(
                s.config.mode == "train" and s.id != session.id for s in self.servicer.sessions.values()
            ):
                log.info(
                    "%s: the last training session left; the next clients start a new federation", self.mode
                )
                self.reset()

    def reset(self) -> None:
        """Forget the federation's state (closed rounds, shared weights): rounds restart at 1."""
        self.head_tail = self._new_rounds()

    def poke(self) -> None:
        self.head_tail.poke()

    def describe(self) -> dict:
        """Fields of ``InfoReply`` that tell clients how to take part."""
        return {
            "federation_mode": PROTO_MODES[self.mode],
            "sync_every": self.sync_every,
            "fedavg_every": self.fedavg_every,
        }

    # ------------------------------------------------------------------ training calls

    async def forward(
        self, session: BodySession, step_id: int, hidden: torch.Tensor, pad: torch.Tensor, offset: int
    ) -> torch.Tensor:
        return await self.servicer._run(session.forward, step_id, hidden, pad, offset)

    async def backward(
        self, session: BodySession, step_id: int, grad: torch.Tensor, weight: float | None = None
    ) -> torch.Tensor:
        return await self.servicer._run(session.backward, step_id, grad)

    async def step(self, session: BodySession, clip: float) -> None:
        await self.servicer._run(session.step, clip)


class SharedAdapter(Coordinator):
    """Base of the modes where every client trains one body adapter with one optimiser."""

    def __init__(self, servicer) -> None:
        super().__init__(servicer)
        self.optimizer: torch.optim.Optimizer | None = None
        self.schedule = (0.0, 0)  # (lr, warmup steps) of the shared optimiser, from its first session

    def prepare(self, config: SessionConfig) -> SessionConfig:
        if config.mode == "train" and config.adapter is None:
            config.adapter = SHARED_ADAPTER
        return config

    def shared(self, session: BodySession) -> bool:
        return session.config.mode == "train" and session.adapter == SHARED_ADAPTER

    def attach(self, session: BodySession) -> None:
        super().attach(session)
        if not self.shared(session):
            return
        if self.optimizer is None:
            self.schedule = (session.config.lr, session.config.warmup_steps)
            params = self.servicer.pool.parameters(SHARED_ADAPTER)
            self.optimizer = (
                torch.optim.AdamW(
                    params, lr=session.config.lr, weight_decay=session.config.weight_decay, foreach=True
                )
                if params
                else None
            )
        session.optimizer = self.optimizer

    def reset(self) -> None:
        super().reset()
        self.optimizer = None
        if SHARED_ADAPTER in self.servicer.pool.settings:  # on the body worker, after any pending compute
            self.servicer.executor.submit(self.servicer.pool.delete, SHARED_ADAPTER)

    def shared_ids(self) -> set[str]:
        return {sid for sid, s in self.attached.items() if self.shared(s)}

    def zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)


class Turn:
    """A FIFO turn among sessions: one holds it from its forward to its optimiser step.

    A holder that goes quiet for longer than ``timeout`` while others wait loses the
    turn (``on_revoke`` is called, and the server logs it), so one stuck client cannot
    stall the rest.
    """

    def __init__(self, timeout: float, on_revoke) -> None:
        self.timeout, self.on_revoke = timeout, on_revoke
        self.holder: str | None = None
        self.since = 0.0
        self.queue: deque[tuple[str, asyncio.Future]] = deque()

    def touch(self, sid: str) -> None:
        if self.holder == sid:
            self.since = time.monotonic()

    async def acquire(self, sid: str) -> None:
        if self.holder == sid:
            self.touch(sid)
            return
        if self.holder is None and not self.queue:
            self.holder, self.since = sid, time.monotonic()
            return
        future = asyncio.get_running_loop().create_future()
        self.queue.append((sid, future))
        try:
            while not future.done():
                try:
                    await asyncio.wait_for(asyncio.shield(future), self.timeout / 2)
                except TimeoutError:
                    idle = time.monotonic() - self.since
                    if self.holder is not None and idle >= self.timeout:
                        log.warning(
                            "sequential: %s kept the turn %.1fs without finishing its step; passing it on",
                            self.holder,
                            idle,
                        )
                        stuck = self.holder
                        self.on_revoke(stuck)
                        self.release(stuck)
        except asyncio.CancelledError:
            self.queue = deque(item for item in self.queue if item[1] is not future)
            if self.holder == sid:
                self.release(sid)
            raise

    def release(self, sid: str) -> None:
        if self.holder != sid:
            return
        self.holder = None
        while self.queue:
            nxt, future = self.queue.popleft()
            if not future.done():
                self.holder, self.since = nxt, time.monotonic()
                future.set_result(None)
                return


class Sequential(SharedAdapter):
    """``sequential``: one client step (forward, backward, optimiser step) at a time on the shared adapter."""

    mode = "sequential"

    def __init__(self, servicer) -> None:
        super().__init__(servicer)
        self.turn = Turn(self.timeout, self._revoke)
        self.steps = 0

    def reset(self) -> None:
        super().reset()
        self.turn = Turn(self.timeout, self._revoke)

    def _revoke(self, sid: str) -> None:
        session = self.attached.get(sid) or self.servicer.sessions.get(sid)
        if session is not None:
            session.graphs.clear()
        self.zero_grad()  # its half-finished step must not leak into the next client's update

    def detach(self, session: BodySession) -> None:
        if self.turn.holder == session.id:
            log.warning("sequential: %s left during its step; passing the turn on", session.id)
            self._revoke(session.id)
            self.turn.release(session.id)
        super().detach(session)

    async def forward(self, session, step_id, hidden, pad, offset):
        if self.shared(session):
            await self.turn.acquire(session.id)
        return await super().forward(session, step_id, hidden, pad, offset)

    async def backward(self, session, step_id, grad, weight=None):
        self.turn.touch(session.id)
        return await super().backward(session, step_id, grad, weight)

    async def step(self, session, clip):
        try:
            await super().step(session, clip)
            self.steps += 1
        finally:
            self.turn.release(session.id)


def make_coordinator(servicer) -> Coordinator:
    """The coordinator for ``servicer.config.mode``."""
    mode = check_mode(getattr(servicer.config, "mode", "independent"))
    if mode == "sequential":
        return Sequential(servicer)
    if mode == "client-batch":
        from .client_batch import ClientBatch

        return ClientBatch(servicer)
    if mode == "server-hierarchical":
        from .hierarchical import ServerHierarchical

        return ServerHierarchical(servicer)
    return Coordinator(servicer)
