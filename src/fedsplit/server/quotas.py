"""Per-client quotas: concurrent sessions, session memory, decode tokens/s and training steps/s.

Every limit is per client id (its token or certificate) and 0 / None means none. A request over
a limit is refused with RESOURCE_EXHAUSTED and a one-line reason; nothing waits, so a refused
client decides when to retry (the rate refusals say after how long), and other clients are never
held up by it.

- **Sessions**: streams holding a session at once (a parked session does not count; its memory does).
- **Memory**: the bytes admission reserves for the client's open sessions, attached or parked
  (KV caches of generate sessions; graphs, adapter and optimiser of train sessions), against
  ``client_memory_budget``; the server-wide ``memory_budget`` still applies to all clients together.
- **Tarpit**: a rate refusal is answered only after the wait it names (at most
  :data:`TARPIT_MAX_S`), so a client that ignores refusals and retries at once still gets through
  at most about one request per refill per session, and cannot spend the server's time (or the
  other clients' latency) on refusals.
- **Rates** are token buckets holding one second's worth (at least one unit): ``client_tokens_per_s``
  counts the rows of each decode step (a one-position forward into a KV cache; prompts are bounded
  by ``max_length`` and memory instead), ``client_steps_per_s`` the optimiser steps. A request costing
  more than a full bucket passes when the bucket is full and leaves it in debt, so the long-run rate
  holds for any batch size.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from .config import ServerConfig

TARPIT_MAX_S = 1.0  # the longest a rate refusal is held back before it is answered


class TokenBucket:
    """``rate`` units per second, at most ``capacity`` saved up; starts full."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate, self.capacity = rate, capacity
        self.level, self.last = capacity, now

    def take(self, cost: float, now: float) -> float:
        """Spend ``cost`` and return 0.0, or spend nothing and return the seconds until it would pass."""
        self.level = min(self.capacity, self.level + (now - self.last) * self.rate)
        self.last = now
        needed = min(cost, self.capacity)
        if self.level >= needed:
            self.level -= cost
            return 0.0
        return (needed - self.level) / self.rate


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


class ClientQuotas:
    """The limits of ``config`` (``client_*`` fields) applied per client; ``clock`` for tests."""

    def __init__(self, config: ServerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_sessions = config.client_max_sessions
        self.memory_budget = config.client_memory_budget
        self.rates = {"tokens": config.client_tokens_per_s, "steps": config.client_steps_per_s}
        self.clock = clock
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def opening(self, client: str) -> asyncio.Lock:
        """Held while one of ``client``'s sessions opens, so its checks and its reservation are one step."""
        lock = self._locks.get(client)
        if lock is None:
            lock = self._locks[client] = asyncio.Lock()
        return lock

    def admit_stream(self, client: str, attached: int) -> str | None:
        """Why ``client``, with ``attached`` sessions on streams now, may not attach one more (None: it may)."""
        if self.max_sessions and attached >= self.max_sessions:
            return (
                f"client {client!r} has {attached} session(s) open, its limit on this server; "
                "close one before opening another"
            )
        return None

    def admit_memory(self, client: str, reserved: int, need: int) -> str | None:
        """Why ``client``, holding ``reserved`` bytes, may not reserve ``need`` more (None: it may)."""
        if self.memory_budget is not None and reserved + need > self.memory_budget:
            return (
                f"session needs {_mib(need)}; client {client!r} holds {_mib(reserved)} of its "
                f"{_mib(self.memory_budget)} limit on this server — close a session or lower max_length"
            )
        return None

    def charge(self, client: str, what: str, cost: float) -> tuple[str, float] | None:
        """Spend ``cost`` of ``client``'s ``what`` ("tokens" or "steps") per second.

        Returns None, or why not and the seconds until the request would have passed."""
        rate = self.rates[what]
        if not rate or cost <= 0:
            return None
        now = self.clock()
        bucket = self._buckets.get((client, what))
        if bucket is None:
            bucket = self._buckets[client, what] = TokenBucket(rate, max(rate, 1.0), now)
        wait = bucket.take(cost, now)
        if wait == 0.0:
            return None
        unit = "decode tokens" if what == "tokens" else "training steps"
        return (
            f"client {client!r} is over its {rate:g} {unit}/s limit on this server; retry in {wait:.2f} s",
            wait,
        )
