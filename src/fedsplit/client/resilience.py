"""Surviving a server restart: generation replays what it sent, training resumes from a common checkpoint.

Generation
    :class:`ReplayingTransport` wraps a transport; its GENERATE sessions remember every
    Forward they sent (the hidden states, after any defence — recomputing them would draw
    fresh noise). When the stream breaks (``UNAVAILABLE``, a server restart, a dropped
    connection) the session reconnects with backoff, opens a new server session, re-sends
    those Forwards in their original order and chunking — so the server rebuilds a KV cache
    bit-identical to the lost one — and retries the step that failed. The caller sees one
    slower step; the output equals an uninterrupted generation.

Training
    :class:`ResilientTrainer` (``fedsplit train --checkpoint-every K [--resume]``) is in
    :mod:`fedsplit.client.checkpointing`; it shares the error classification below.
"""

from __future__ import annotations

import logging
import time

import grpc
import torch

from ..wire.protocol import SessionConfig
from .remote import RemoteError, ServerUnreachable

log = logging.getLogger(__name__)

#: Status codes after which a fresh session may succeed: the server went away or restarted.
RECOVERABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)


def is_recoverable(exc: BaseException) -> bool:
    """True for a lost server or stream; False for a refusal (bad input, auth, model mismatch)."""
    if isinstance(exc, ServerUnreachable):
        return True
    return isinstance(exc, RemoteError) and exc.code in RECOVERABLE


class Backoff:
    """Exponential backoff with a deadline: ``wait()`` sleeps, or returns False once time is up."""

    def __init__(self, timeout: float, first: float = 0.25, longest: float = 5.0) -> None:
        self.deadline = time.monotonic() + timeout
        self.delay, self.longest = first, longest

    def wait(self) -> bool:
        left = self.deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(self.delay, left))
        self.delay = min(self.delay * 2, self.longest)
        return True


def _quiet_close(session) -> None:
    try:
        session.close()
    except Exception:  # the old stream is already broken; nothing to tell the server
        pass


class ReplayingSession:
    """A GENERATE session that survives the loss of its server session by replaying its history."""

    def __init__(
        self, transport, config: SessionConfig, reconnect_timeout: float = 300.0, exact: bool = True
    ) -> None:
        self.transport, self.config = transport, config
        self.reconnect_timeout, self.exact = reconnect_timeout, exact
        self.history: list[tuple[int, torch.Tensor, torch.Tensor, int]] = []  # cache-extending forwards
        self.adapter = None  # a body adapter pushed into this session: re-pushed first on a replay
        self.reconnects = 0
        self.session = transport.open(config)

    @property
    def id(self) -> str:
        return self.session.id

    def _retrying(self, call):
        while True:
            try:
                return call()
            except (RemoteError, ServerUnreachable) as exc:
                if not is_recoverable(exc):
                    raise
                log.warning(
                    "generation session lost (%s); reconnecting and replaying %d step(s)",
                    exc,
                    len(self.history),
                )
                self._reconnect(exc)

    def forward(
        self,
        step_id: int,
        hidden: torch.Tensor,
        pad_lengths: torch.Tensor,
        offset: int = 0,
        keep_graph: bool = True,
        use_cache: bool = True,
    ) -> torch.Tensor:
        out = self._retrying(
            lambda: self.session.forward(
                step_id, hidden, pad_lengths, offset, keep_graph=keep_graph, use_cache=use_cache
            )
        )
        if use_cache:  # a stateless forward leaves nothing on the server to rebuild
            self.history.append((step_id, hidden.detach().clone(), pad_lengths.clone(), offset))
        return out

    def put_adapter(self, settings, state) -> None:
        self._retrying(lambda: self.session.put_adapter(settings, state))
        self.adapter = (settings, state)

    def adapter_state(self):
        return self._retrying(self.session.adapter_state)

    def _replay(self, session) -> None:
        if self.adapter is not None:
            session.put_adapter(*self.adapter)
        if not self.history:
            return
        if self.exact:  # the same forwards, the same chunks: the server's cache comes out bit-identical
            for step_id, hidden, pad, offset in self.history:
                session.forward(step_id, hidden, pad, offset)
            return
        # One prefill of everything sent so far: fewer round trips, equal up to float rounding.
        hidden = torch.cat([h for _, h, _, _ in self.history], dim=1)
        session.forward(self.history[0][0], hidden, self.history[-1][2], 0)

    def _reconnect(self, cause: BaseException) -> None:
        _quiet_close(self.session)
        backoff = Backoff(self.reconnect_timeout)
        while True:
            try:
                session = self.transport.open(self.config)
                self._replay(session)
            except (RemoteError, ServerUnreachable) as exc:
                if not is_recoverable(exc):
                    raise
                if not backoff.wait():
                    raise ServerUnreachable(
                        f"lost the generation session ({cause}) and could not rebuild it within "
                        f"{self.reconnect_timeout:.0f}s ({exc})"
                    ) from None
                continue
            self.session = session
            self.reconnects += 1
            log.info(
                "generation session rebuilt as %s after replaying %d step(s)", session.id, len(self.history)
            )
            return

    def __getattr__(self, name):  # anything else (config of the stream, traffic, ...) is the live session's
        if name == "session":
            raise AttributeError(name)
        return getattr(self.session, name)

    def step(self, clip_norm: float = 0.0) -> None:
        raise RuntimeError("optimizer step on a generate session")

    def backward(self, step_id: int, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("backward on a generate session")

    def close(self) -> None:
        self.history.clear()
        _quiet_close(self.session)


class ReplayingTransport:
    """Wraps a transport so that its generation sessions survive server restarts.

    Training sessions pass through unchanged (their recovery needs checkpoints: see
    :class:`fedsplit.client.checkpointing.ResilientTrainer`). Everything else — ``info``,
    ``traffic``, ``close`` — is the wrapped transport's.
    """

    def __init__(self, transport, reconnect_timeout: float = 300.0, exact: bool = True) -> None:
        self.inner, self.reconnect_timeout, self.exact = transport, reconnect_timeout, exact

    def open(self, config: SessionConfig, *args, **kwargs):
        if config.mode != "generate" or args or kwargs:
            return self.inner.open(config, *args, **kwargs)
        return ReplayingSession(self.inner, config, self.reconnect_timeout, self.exact)

    def __getattr__(self, name):
        return getattr(self.inner, name)
