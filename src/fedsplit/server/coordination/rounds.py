"""Rounds on the server: wait for every client (or a deadline), then act once for all of them.

:class:`Gather` is the one primitive every coordinated mode uses — the forward, backward
and optimiser-step barriers of client-batch training, the body-replica sync of
server-hierarchical training, and the head/tail FedAvg rounds behind the ``Adapters``
RPC (:class:`HeadTailRounds`). A client that stops answering never blocks the others for
longer than the round timeout: the round goes ahead with whoever arrived and the server
logs who was missing.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from ...wire import codec
from ...wire import fedsplit_pb2 as pb
from ..session import SessionError
from .fedavg import weighted_average

log = logging.getLogger(__name__)

Expected = Callable[[], "set[str] | int"]


class Gather:
    """Collects one request per member; runs ``run`` once when the round is complete.

    The round is complete when every member named by ``expected()`` has submitted
    (``expected`` may also return a count), or ``timeout`` seconds after the first
    submission. ``expected`` is re-read on every submission and on :meth:`poke` — call
    it when a client leaves, so the others need not wait for the deadline.
    ``run({member: item})`` returns ``{member: result}``; a result that is an exception
    is raised in that member's ``submit`` only.
    """

    def __init__(
        self,
        name: str,
        timeout: float,
        expected: Expected,
        run: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
    ) -> None:
        self.name, self.timeout, self.expected, self.run = name, timeout, expected, run
        self.pending: dict[str, tuple[Any, asyncio.Future]] = {}
        self.rounds = 0
        self.timeouts = 0
        self._timer: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    def __len__(self) -> int:
        return len(self.pending)

    async def submit(self, member: str, item: Any) -> Any:
        """Join the current round; returns this member's result once the round has run."""
        if member in self.pending:
            raise SessionError("FAILED_PRECONDITION", f"{self.name}: already waiting in this round")
        future = asyncio.get_running_loop().create_future()
        self.pending[member] = (item, future)
        if self._timer is None:
            self._timer = asyncio.create_task(self._deadline(self.rounds))
        self.poke()
        try:
            return await future
        except asyncio.CancelledError:  # the client's stream ended while it waited
            if self.pending.get(member, (None, None))[1] is future:
                del self.pending[member]
                self.poke()
            raise

    def _complete(self) -> bool:
        expected = self.expected()
        if isinstance(expected, int):
            return len(self.pending) >= expected
        return set(self.pending) >= expected

    def poke(self) -> None:
        """Run the round now if everyone still expected has arrived."""
        if self.pending and self._complete():
            self._fire()

    def _fire(self) -> None:
        batch, self.pending = self.pending, {}
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.rounds += 1
        task = asyncio.create_task(self._execute(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, batch: dict[str, tuple[Any, asyncio.Future]]) -> None:
        live = {member: item for member, (item, future) in batch.items() if not future.done()}
        try:
            results = await self.run(live) if live else {}
        except Exception as exc:  # noqa: BLE001 - every waiter learns why the round failed
            log.exception("%s: round failed", self.name)
            results = {member: exc for member in live}
        for member, (_, future) in batch.items():
            if future.done():
                continue
            result = results.get(member)
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _deadline(self, round_no: int) -> None:
        await asyncio.sleep(self.timeout)
        if self.rounds != round_no or not self.pending:
            return
        expected = self.expected()
        missing = sorted(expected - set(self.pending)) if isinstance(expected, set) else []
        wanted = len(expected) if isinstance(expected, set) else expected
        self.timeouts += 1
        log.warning(
            "%s: round timeout after %.1fs — going ahead with %d of %d client(s); missing: %s",
            self.name,
            self.timeout,
            len(self.pending),
            wanted,
            ", ".join(missing) or "unknown",
        )
        self._timer = None
        self._fire()


class HeadTailRounds:
    """FedAvg of the clients' head/tail adapters (the ``Adapters`` RPC).

    Every client of round ``r`` uploads its adapter tensors with its number of training
    examples; when all expected clients have uploaded (or the round timeout passes) the
    server averages them key by key, weighted by examples, and answers every upload with
    the average of the keys that client sent. A client arriving after its round closed
    gets the round's average straight away.
    """

    KEEP = 8  # closed rounds remembered for late clients

    def __init__(self, timeout: float, expected: Callable[[], int], max_elements: int) -> None:
        self.timeout, self.expected, self.max_elements = timeout, expected, max_elements
        self.open: dict[int, Gather] = {}
        self.closed: OrderedDict[int, tuple[dict, int]] = OrderedDict()
        self._ids = itertools.count(1)

    def poke(self) -> None:
        for gather in list(self.open.values()):
            gather.poke()

    async def upload(self, owner: str, request: pb.AdapterUpload) -> pb.AdapterReply:
        state = codec.from_named_tensors(request.tensors, max_elements=self.max_elements)
        if not state:
            raise codec.WireError("an AdapterUpload needs at least one tensor")
        rnd = int(request.round)
        if rnd in self.closed:
            mean, clients = self.closed[rnd]
            log.warning(
                "head/tail FedAvg round %d: late upload from %s gets the closed round's average", rnd, owner
            )
        else:
            gather = self.open.get(rnd)
            if gather is None:
                gather = self.open[rnd] = Gather(
                    f"head/tail FedAvg round {rnd}",
                    self.timeout,
                    lambda: max(1, self.expected()),
                    lambda items, r=rnd: self._average(r, items),
                )
            member = f"{owner}:{request.client_id or 'client'}#{next(self._ids)}"
            mean, clients = await gather.submit(member, (state, int(request.num_examples)))
        tensors = {k: mean.get(k, v) for k, v in state.items()}
        return pb.AdapterReply(round=rnd, tensors=codec.named_tensors(tensors, "fp32"), num_clients=clients)

    async def _average(self, rnd: int, items: dict[str, tuple[dict, int]]) -> dict:
        self.open.pop(rnd, None)
        states = [state for state, _ in items.values()]
        weights = [float(n) for _, n in items.values()]
        try:
            mean = await asyncio.to_thread(weighted_average, states, weights)
        except ValueError as exc:
            error = codec.WireError(f"round {rnd}: {exc}")
            return {member: error for member in items}
        self.closed[rnd] = (mean, len(items))
        while len(self.closed) > self.KEEP:
            self.closed.popitem(last=False)
        log.info(
            "head/tail FedAvg round %d: averaged %d client(s), %d examples",
            rnd,
            len(items),
            int(sum(weights)),
        )
        return {member: (mean, len(items)) for member in items}
