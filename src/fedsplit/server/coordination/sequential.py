"""``sequential`` training: the shared body adapter, one client step (forward to optimiser step) at a time."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from ..session import BodySession
from .base import BodyHost, SharedAdapter

log = logging.getLogger(__name__)


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

    def __init__(self, host: BodyHost) -> None:
        super().__init__(host)
        self.turn = Turn(self.timeout, self._revoke)
        self.steps = 0

    def reset(self) -> None:
        super().reset()
        self.turn = Turn(self.timeout, self._revoke)

    def _revoke(self, sid: str) -> None:
        session = self.attached.get(sid) or self.host.sessions.get(sid)
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
