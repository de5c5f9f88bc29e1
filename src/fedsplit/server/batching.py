"""Continuous batching of generation steps across sessions.

Decode steps (one token per row) that wait while the body worker is busy are run
together as one forward. Sessions have caches of different lengths; they are
right-aligned by extra left padding — a row with ``L`` cached tokens in a batch whose
longest cache is ``Lmax`` gets ``Lmax - L`` more pad positions, which the mask rule
already excludes — and split back afterwards. A lone session pays nothing extra.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

import torch

from ..model.segments import KVCache

log = logging.getLogger(__name__)


def _run_group(items) -> list[torch.Tensor]:
    """One body forward for decode steps of sessions sharing a span and an adapter."""
    sessions = [it[0] for it in items]
    batch_rows = [it[1].shape[0] for it in items]  # each session's rows in the merged batch
    lengths = [s.cache.length for s in sessions]
    longest = max(lengths)
    merged = KVCache()
    merged.length = longest
    for layer in sessions[0].cache.layers:
        keys, values = [], []
        for s, length in zip(sessions, lengths):
            k, v = s.cache.layers[layer]
            shift = longest - length
            keys.append(torch.nn.functional.pad(k, (0, 0, shift, 0)))
            values.append(torch.nn.functional.pad(v, (0, 0, shift, 0)))
        merged.layers[layer] = (torch.cat(keys), torch.cat(values))
    hidden = torch.cat([it[1] for it in items])
    pad = torch.cat([it[2] + (longest - length) for it, length in zip(items, lengths)])
    first = sessions[0]
    first.pool.activate(first.adapter)
    with torch.no_grad():
        out = first.body(hidden, pad, merged, longest, span=first.config.span)
    results, row = [], 0
    for s, length, n in zip(sessions, lengths, batch_rows):
        rows = slice(row, row + n)
        shift = longest - length
        s.cache.layers = {i: (k[rows, :, shift:], v[rows, :, shift:]) for i, (k, v) in merged.layers.items()}
        s.cache.length = length + 1
        results.append(out[rows])
        row += n
    return results


def run_batch(items) -> list[torch.Tensor | Exception]:
    """Validate each step, group compatible ones, run each group once."""
    results: list[torch.Tensor | Exception | None] = [None] * len(items)
    groups = defaultdict(list)
    for index, (session, hidden, pad, offset) in enumerate(items):
        try:
            session.check_inputs(hidden, pad, offset)
        except Exception as exc:  # reported to that session only
            results[index] = exc
            continue
        cached = bool(session.cache.layers) or session.config.span[0] == session.config.span[1]
        key = (session.config.span, session.adapter) if cached else ("solo", index)
        groups[key].append(index)
    for indices in groups.values():
        try:
            if len(indices) == 1:
                session, hidden, pad, offset = items[indices[0]]
                outs = [session.forward(0, hidden, pad, offset)]
            else:
                outs = _run_group([items[i] for i in indices])
            for i, out in zip(indices, outs):
                results[i] = out
        except Exception as exc:
            log.exception("batched decode failed")
            for i in indices:
                results[i] = exc
    return results


class WorkerBatcher:
    """Collects requests while the body worker is busy; hands them to ``run`` together when it frees up.

    ``worker(fn, *args)`` awaits ``fn(*args)`` on the body worker (the servicer's ``run``).
    ``run(items)`` runs on the worker and returns one result per item (an exception is
    raised in that item's ``submit`` only). By default a request that finds the worker idle
    runs at once, alone. With ``linger`` > 0 and ``expected()`` (how many requests the
    caller expects soon, counting those queued), a batch waits up to ``linger`` seconds for
    the rest to arrive: fewer, fuller passes, each cheaper per row than a small one.
    """

    def __init__(self, worker, run, linger: float = 0.0, expected=None) -> None:
        self.worker, self.run = worker, run
        self.linger, self.expected = linger, expected
        self.pending: list = []
        self._runner: asyncio.Task | None = None
        self._arrived: asyncio.Event | None = None  # set while a batch lingers
        self.batches = 0
        self.rows = 0

    async def submit(self, *item):
        future = asyncio.get_running_loop().create_future()
        self.pending.append((item, future))
        self.poke()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._drain())
        return await future

    def poke(self) -> None:
        """Re-check ``expected()`` now (e.g. a client left)."""
        if self._arrived is not None:
            self._arrived.set()

    async def _gathered(self) -> None:
        """Wait until ``expected()`` requests are queued, or ``linger`` seconds have passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.linger
        self._arrived = asyncio.Event()
        try:
            while len(self.pending) < self.expected():
                left = deadline - loop.time()
                if left <= 0:
                    return
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    return
        finally:
            self._arrived = None

    async def _drain(self) -> None:
        while self.pending:
            if self.linger > 0 and self.expected is not None:
                await self._gathered()
            batch, self.pending = self.pending, []
            batch = [(item, future) for item, future in batch if not future.done()]  # not cancelled
            if not batch:
                continue
            items = [item for item, _ in batch]
            self.batches += 1
            self.rows += len(items)
            try:
                results = await self.worker(self.run, items)
            except Exception as exc:  # noqa: BLE001 - a failure of the whole batch reaches every item
                log.exception("batched body call failed")
                results = [exc] * len(items)
            for (_, future), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)


class DecodeBatcher(WorkerBatcher):
    """Continuous batching of decode steps: ``submit(session, hidden, pad, offset)``."""

    def __init__(self, worker) -> None:
        super().__init__(worker, run_batch)
