"""What every coordinator shares: the modes, the host interface, and the two base coordinators.

The servicer calls a coordinator for each training forward, backward and step, and tells it
when a session's stream attaches and detaches. Generation is never coordinated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

import torch

from ...model.segments import Body
from ...wire import fedsplit_pb2 as pb
from ...wire.protocol import SessionConfig
from ..adapters import AdapterPool
from ..config import ServerConfig
from ..session import BodySession
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

T = TypeVar("T")


def check_mode(mode: str) -> str:
    """``mode`` if it names a training mode; a ValueError that lists the modes otherwise."""
    if mode not in MODES:
        raise ValueError(f"unknown training mode {mode!r}; choose one of: {', '.join(MODES)}")
    return mode


class BodyHost(Protocol):
    """What a coordinator may use of the server that holds the body.

    :class:`~fedsplit.server.service.SplitServicer` implements it. All body compute runs on
    one worker thread, in the order it was handed over, so a coordinator never touches the
    weights from the event loop: it awaits :meth:`run` or queues :meth:`submit`.
    """

    @property
    def body(self) -> Body:
        """The held decoder layers (frozen base weights shared by every adapter)."""
        ...

    @property
    def pool(self) -> AdapterPool:
        """The body's LoRA adapters, by name (a session's own, a run's, the shared one)."""
        ...

    @property
    def config(self) -> ServerConfig:
        """The settings: ``mode``, ``round_timeout``, ``sync_every``, ``fedavg_period()``, ``gather_ms``."""
        ...

    @property
    def sessions(self) -> Mapping[str, BodySession]:
        """Every open session by id, attached or parked; the host adds and removes them."""
        ...

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the body worker, after the work handed over before it; its result."""
        ...

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` on the body worker without waiting (from code that cannot await)."""
        ...


class Coordinator:
    """``independent``: each training session trains its own body adapter; nothing is coordinated."""

    mode = "independent"

    def __init__(self, host: BodyHost) -> None:
        self.host = host
        config = host.config
        self.timeout = float(config.round_timeout)
        self.sync_every = int(config.sync_every)
        self.fedavg_every = int(config.fedavg_period())
        self.attached: dict[str, BodySession] = {}
        self.head_tail = self._new_rounds()

    def _new_rounds(self) -> HeadTailRounds:
        return HeadTailRounds(self.timeout, lambda: len(self.attached), self.host.config.max_message_bytes)

    # ------------------------------------------------------------------ session life cycle

    def prepare(self, config: SessionConfig) -> SessionConfig:
        """Adjust a session's config before the session is created (e.g. share an adapter)."""
        return config

    def attach(self, session: BodySession) -> None:
        """A stream opened or resumed ``session``: count it among the clients rounds wait for."""
        if session.config.mode == "train":
            self.attached[session.id] = session

    def detach(self, session: BodySession) -> None:
        """The session's stream ended (closed or broken): nobody waits for it any more."""
        if self.attached.pop(session.id, None) is not None:
            self.poke()
            if not any(s.config.mode == "train" and s.id != session.id for s in self.host.sessions.values()):
                log.info(
                    "%s: the last training session left; the next clients start a new federation", self.mode
                )
                self.reset()

    def reset(self) -> None:
        """Forget the federation's state (closed rounds, shared weights): rounds restart at 1."""
        self.head_tail = self._new_rounds()

    def poke(self) -> None:
        """Re-check every open round now that the set of attached clients changed."""
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
        """A training forward that keeps its graph; the body output."""
        return await self.host.run(session.forward, step_id, hidden, pad, offset)

    async def backward(
        self, session: BodySession, step_id: int, grad: torch.Tensor, weight: float | None = None
    ) -> torch.Tensor:
        """The backward of ``step_id``'s forward; the gradient w.r.t. the body input."""
        return await self.host.run(session.backward, step_id, grad)

    async def step(self, session: BodySession, clip: float) -> None:
        """The optimiser step after the client's backward(s)."""
        await self.host.run(session.step, clip)


class SharedAdapter(Coordinator):
    """Base of the modes where every client trains one body adapter with one optimiser."""

    def __init__(self, host: BodyHost) -> None:
        super().__init__(host)
        self.optimizer: torch.optim.Optimizer | None = None
        self.schedule = (0.0, 0)  # (lr, warmup steps) of the shared optimiser, from its first session

    def prepare(self, config: SessionConfig) -> SessionConfig:
        if config.mode == "train" and config.adapter is None:
            config.adapter = SHARED_ADAPTER
        return config

    def shared(self, session: BodySession) -> bool:
        """Whether ``session`` trains the shared adapter (not a named run's own one)."""
        return session.config.mode == "train" and session.adapter == SHARED_ADAPTER

    def attach(self, session: BodySession) -> None:
        super().attach(session)
        if not self.shared(session):
            return
        if self.optimizer is None:
            self.schedule = (session.config.lr, session.config.warmup_steps)
            params = self.host.pool.parameters(SHARED_ADAPTER)
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
        if SHARED_ADAPTER in self.host.pool.settings:  # on the body worker, after any pending compute
            self.host.submit(self.host.pool.delete, SHARED_ADAPTER)

    def shared_ids(self) -> set[str]:
        """The attached sessions that train the shared adapter."""
        return {sid for sid, s in self.attached.items() if self.shared(s)}

    def zero_grad(self) -> None:
        """Drop the shared adapter's accumulated gradient (call it on the body worker)."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
