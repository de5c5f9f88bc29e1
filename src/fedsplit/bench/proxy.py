"""A network-shaping TCP proxy on loopback: wide-area latency and bandwidth on one machine.

Every byte from client to server and back is delayed by ``rtt / 2`` in each direction
and leaves through a token bucket of ``bandwidth`` (bits per second, per connection and
direction — each client has its own access link). Order is preserved: a chunk never
overtakes an earlier one. The proxy listens on 127.0.0.1 only and forwards only to a
loopback target; it exists to measure, not to route.

    with ShapingProxy(("127.0.0.1", 7070), rtt_ms=20, bandwidth_mbps=100) as proxy:
        client = RemoteTransport(proxy.address)
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class TokenBucket:
    """Departure times for chunks sent through a link of ``rate`` bytes/s with ``burst`` bytes of credit.

    Credit may go negative (a chunk larger than the credit is sent at once but owes the
    difference), which keeps departures in order and the long-run rate at ``rate``.
    """

    rate: float | None  # bytes per second; None = unlimited
    burst: float = 16 * 1024
    tokens: float = 0.0
    stamp: float = 0.0

    def __post_init__(self) -> None:
        self.tokens = self.burst
        self.stamp = time.monotonic()

    def departure(self, size: int, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        if self.rate is None:
            return now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= size
        return now + max(0.0, -self.tokens) / self.rate


class ShapingProxy:
    """Forward ``127.0.0.1:<port>`` to ``target`` with a delay and a bandwidth cap; runs in a thread."""

    def __init__(
        self,
        target: tuple[str, int],
        rtt_ms: float = 0.0,
        bandwidth_mbps: float = 0.0,
        port: int = 0,
        burst_bytes: int = 16 * 1024,
    ) -> None:
        if target[0] not in LOOPBACK:
            raise ValueError(f"the shaping proxy only forwards to loopback, not {target[0]!r}")
        if rtt_ms < 0 or bandwidth_mbps < 0:
            raise ValueError("rtt_ms and bandwidth_mbps must be >= 0")
        self.target, self.port = target, port
        self.delay = rtt_ms / 2000.0
        self.rate = bandwidth_mbps * 1e6 / 8 if bandwidth_mbps > 0 else None
        self.burst = burst_bytes
        self.bytes = {"up": 0, "down": 0}
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ life cycle

    def start(self) -> ShapingProxy:
        ready = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._handle, "127.0.0.1", self.port, family=socket.AF_INET)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                error.append(exc)
                ready.set()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="shaping-proxy", daemon=True)
        self._thread.start()
        ready.wait(timeout=10)
        if error:
            raise error[0]
        log.info(
            "shaping proxy %s -> %s:%d (rtt %.0f ms, %s)",
            self.address,
            *self.target,
            self.delay * 2000,
            f"{self.rate * 8 / 1e6:g} Mbit/s" if self.rate else "no bandwidth cap",
        )
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                task.cancel()

        if loop.is_running():
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=10)
        self._loop = None

    def __enter__(self) -> ShapingProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ traffic

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError as exc:
            log.warning("shaping proxy: cannot reach %s:%d (%s)", *self.target, exc)
            client_w.close()
            return
        up = TokenBucket(self.rate, self.burst)
        down = TokenBucket(self.rate, self.burst)
        try:
            await asyncio.gather(
                self._pipe(client_r, server_w, up, "up"), self._pipe(server_r, client_w, down, "down")
            )
        except asyncio.CancelledError:  # the proxy is stopping: drop the connection quietly
            pass
        finally:
            for writer in (client_w, server_w):
                writer.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: TokenBucket, direction: str
    ) -> None:
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def send() -> None:
            while True:
                item = await queue.get()
                if item is None:
                    break
                due, data = item
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

        sender = asyncio.create_task(send())
        try:
            while data := await reader.read(CHUNK):
                self.bytes[direction] += len(data)
                now = time.monotonic()
                due = link.departure(len(data), now) + self.delay
                queue.put_nowait((loop.time() + (due - now), data))
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait(None)
            try:
                await sender
            except (ConnectionError, OSError):
                pass
