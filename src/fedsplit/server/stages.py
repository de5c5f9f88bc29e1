"""Pipeline stages of the body on Ray: ``fedsplit serve --stages S``.

The gRPC front end (:class:`StagedServicer`, a :class:`~fedsplit.server.service.SplitServicer`)
keeps everything it does in one process — authentication, sessions, admission, quotas, audit,
checkpoints of named runs — but holds no layers. The body's layers are cut into ``S``
contiguous spans (balanced by parameters unless ``--stage-layers`` says otherwise), each held
by one Ray actor (:class:`StageWorker`): one GPU per actor when the cluster has GPUs, else CPU.

Each stage keeps, per session, its slice of the session's state in an ordinary
:class:`~fedsplit.server.session.BodySession` over its part of the session's span: its slice of
the KV cache, of the body LoRA and of the AdamW state, and its pending autograd graphs. A
:class:`StagedSession` at the front end has the interface of a ``BodySession`` (async): a
forward runs stage 1 → S and a backward S → 1, each stage's output handed to the next stage
as a Ray object reference (actor to actor through Ray's object store; hidden states never go
back through the front end or the client). Ray's object store carries pickled tensors between
the actors and the front end, which all belong to the compute owner; nothing pickled crosses
the client's network connection, which stays protobuf over gRPC.

Sessions are pipelined: every session's call is its own coroutine on the front end's event
loop, so stage 1 works on session B while stage 2 works on session A; inside a stage, decode
steps of different sessions that queue while it computes run as one batch (:class:`StageActor`).

Faults: stage actors restart (``max_restarts``). A generation session replays, into a
restarted stage, the inputs it sent that stage so far (the very tensors, same chunking, so the
rebuilt KV cache is bit-identical) and retries the step; the client sees one slower step. A
training session on a restarted stage lost its graphs and adapter slice: its stream ends with
``UNAVAILABLE`` and the client re-opens its run, which resumes from the latest checkpoint every
stage holds (each stage writes its own, under ``--checkpoint-dir``/``stage-A-B``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import inspect
import itertools
import logging
import math
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..model.lora import LoraSettings
from ..wire.protocol import SessionConfig
from .checkpoint import RunCheckpoints
from .config import ServerConfig
from .coordination.base import SHARED_ADAPTER, Coordinator
from .coordination.client_batch import ClientBatch
from .coordination.hierarchical import ServerHierarchical
from .coordination.joint import Round, Slot
from .service import SplitServicer
from .session import BodySession, SessionError, SessionLost, check_session_config, warm_up

log = logging.getLogger(__name__)

#: How often Ray restarts a stage actor that died before giving up on it.
STAGE_MAX_RESTARTS = 8
#: Seconds to wait for the stages to load their layers, or for a restarted one to come back.
STAGE_READY_TIMEOUT = 600.0
#: Replays of a generation step after stage failures before the client is told UNAVAILABLE.
REPLAY_ATTEMPTS = 3
#: Calls a stage actor takes at once (each waits for the stage's compute thread; decode steps batch).
STAGE_CONCURRENCY = 256
#: Training modes a staged server runs (the others' joint passes and shared optimiser need one body).
STAGED_MODES = ("independent", "client-batch", "server-hierarchical")
#: Logical CPUs a stage actor asks Ray for: enough to place it, little enough that the stages of
#: several servers fit on a small machine (its torch threads are set apart: ``--threads``).
STAGE_CPUS = 0.1
RAY_MISSING = "--stages needs Ray: install the ray extra (pip install 'fedsplit[ray]', or ray==2.60.0)"


# ---------------------------------------------------------------------------------------- plan


def plan_stages(
    counts: list[int],
    held: tuple[int, int],
    stages: int,
    given: tuple[tuple[int, int], ...] | None = None,
) -> list[tuple[int, int]]:
    """The layer span of each stage: ``given`` (checked), else ``stages`` contiguous spans of the
    held layers whose largest parameter count (``counts[i]``: layer i's) is as small as can be."""
    start, end = held
    if given:
        spans = [tuple(span) for span in given]
        if spans[0][0] != start or spans[-1][1] != end:
            raise ValueError(
                f"--stage-layers {_spans_text(spans)} must cover the held layers {start}:{end} exactly"
            )
        if stages > 1 and len(spans) != stages:
            raise ValueError(f"--stage-layers gives {len(spans)} stages, --stages {stages}")
        return spans
    n = end - start
    if not 1 <= stages <= n:
        raise ValueError(
            f"--stages {stages}: the server holds {n} layers ({start}:{end}); use 1 to {n} stages"
        )
    weights = counts[start:end]
    prefix = list(itertools.accumulate(weights, initial=0))
    # best[k][i]: (largest stage, sum of squares) for layers [0, i) in k stages; the squares break ties.
    inf = (math.inf, math.inf)
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = (0, 0)
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                if best[k - 1][j] == inf:
                    continue
                size = prefix[i] - prefix[j]
                cand = (max(best[k - 1][j][0], size), best[k - 1][j][1] + size * size)
                if cand < best[k][i]:
                    best[k][i], cut[k][i] = cand, j
    spans, i = [], n
    for k in range(stages, 0, -1):
        j = cut[k][i]
        spans.append((start + j, start + i))
        i = j
    return spans[::-1]


def _spans_text(spans) -> str:
    return ",".join(f"{a}:{b}" for a, b in spans)


# ---------------------------------------------------------------------------------------- actor


class StageLostSession(Exception):
    """A stage does not hold the session: it restarted since the session was opened there."""


class StageWorker:
    """One stage (a Ray actor): body layers ``[a, b)`` and its slice of every session.

    Plain Python: :func:`start_stages` wraps it with ``ray.remote``. Every method runs in the
    actor's process, one call at a time, in the order each caller sent them.
    """

    def __init__(
        self,
        index: int,
        model: str,
        span: tuple[int, int],
        device: str,
        dtype: str,
        threads: int,
        fingerprint: str,
        checkpoint_dir: str | None,
        checkpoint_keep: int,
        max_graphs: int,
        graph_ttl: float,
    ) -> None:
        from ..model.device import resolve_device, resolve_dtype
        from ..model.split import load_part
        from .adapters import AdapterPool
        from .placement import resolve_memory_budget

        if threads > 0:
            torch.set_num_threads(threads)
        self.index, self.span = index, tuple(span)
        self.incarnation = uuid.uuid4().hex  # a restarted actor gets a new one
        place = resolve_device(device)
        self.body = load_part(model, "body", span=self.span, device=place, dtype=resolve_dtype(dtype, place))
        self.pool = AdapterPool(self.body)
        self.budget = resolve_memory_budget(None, self.pool.device)
        self.max_graphs, self.graph_ttl = max_graphs, graph_ttl
        self.sessions: dict[str, BodySession] = {}
        # generate: (offset, tokens, output) of each session's latest cached forward, so a step the
        # front end retries after another stage failed is answered again, not run twice
        self.latest: dict[str, tuple[int, int, torch.Tensor]] = {}
        self.rounds: dict[int, tuple] = {}  # client-batch: round -> (inputs, outputs, caller's place)
        self.shared_optimizer: torch.optim.Optimizer | None = None
        root = Path(checkpoint_dir) / f"stage-{self.span[0]}-{self.span[1]}" if checkpoint_dir else None
        self.runs = RunCheckpoints(root, 0, checkpoint_keep, fingerprint)

    def describe(self) -> dict:
        return {
            "incarnation": self.incarnation,
            "span": self.span,
            "device": str(self.pool.device),
            "dtype": str(self.pool.dtype).removeprefix("torch."),
            "budget": self.budget,
            "pid": os.getpid(),
        }

    def ping(self) -> str:
        return self.incarnation

    def _session(self, sid: str) -> BodySession:
        session = self.sessions.get(sid)
        if session is None:
            raise StageLostSession(f"stage {self.index} ({self.incarnation}) holds no session {sid}")
        return session

    def open(self, sid: str, owner: str, config: SessionConfig) -> str:
        """Hold ``sid``'s slice (a fresh one if it held one); returns this actor's incarnation."""
        StageWorker.close(self, sid)  # this class's: a StageActor's own would wait on this very thread
        self.sessions[sid] = BodySession(self.body, self.pool, config, owner, self.max_graphs, self.graph_ttl)
        return self.incarnation

    def forward(
        self,
        sid: str,
        step_id: int,
        hidden: torch.Tensor,
        pad: torch.Tensor,
        offset: int,
        keep_graph: bool,
        use_cache: bool,
    ) -> torch.Tensor:
        session = self._session(sid)
        cached = session.config.mode == "generate" and use_cache
        if cached:
            latest = self.latest.get(sid)
            tokens = hidden.shape[1]
            if (
                latest is not None
                and latest[:2] == (offset, tokens)
                and session.cache.length == offset + tokens
            ):
                return latest[2]  # this step ran here already: a retry after a later stage failed
        out = session.forward(step_id, hidden, pad, offset, keep_graph, use_cache)
        if cached:
            self.latest[sid] = (offset, hidden.shape[1], out)
        return out

    def backward(self, sid: str, step_id: int, grad: torch.Tensor) -> torch.Tensor:
        return self._session(sid).backward(step_id, grad)

    def grad_norm_sq(self, sid: str) -> float:
        """Sum of squares of the session's body-LoRA gradients on this stage (for a global clip)."""
        session = self._session(sid)
        grads = [p.grad for p in self.pool.parameters(session.adapter) if p.grad is not None]
        return float(sum(g.detach().float().pow(2).sum() for g in grads)) if grads else 0.0

    def step(self, sid: str, clip_norm: float, total_norm: float) -> int:
        """The optimiser step, after scaling the gradients as ``clip_grad_norm_`` would over all stages."""
        session = self._session(sid)
        if clip_norm > 0 and session.adapter is not None:
            coef = min(1.0, clip_norm / (total_norm + 1e-6))
            for p in self.pool.parameters(session.adapter):
                if p.grad is not None:
                    p.grad.mul_(coef)
        session.step(0.0)
        return session.steps

    def adapter_grads(self, sid: str) -> dict[str, torch.Tensor]:
        """The session's body-LoRA gradients on this stage (tests compare them with one process's)."""
        session = self._session(sid)
        suffix = f".{session.adapter}.weight"
        return {
            name.removesuffix(suffix) + ".weight": p.grad.detach().clone()
            for name, p in self.body.named_parameters()
            if "lora_" in name and name.endswith(suffix) and p.grad is not None
        }

    def adapter_state(self, sid: str) -> tuple[LoraSettings, dict[str, torch.Tensor]]:
        return self._session(sid).adapter_state()

    def put_adapter(self, sid: str, settings: LoraSettings, state: dict[str, torch.Tensor]) -> None:
        self._session(sid).put_adapter(settings, state)

    def memory_bytes(self, sid: str) -> int:
        return self._session(sid).memory_bytes()

    def run_steps(self, owner: str, run_id: str) -> list[int]:
        return self.runs.steps(owner, run_id)

    def restore(self, sid: str, step: int) -> int:
        return self.runs.restore(self._session(sid), [step])

    def save(self, sid: str) -> bool:
        return self.runs.save(self._session(sid))

    # ------------------------------------------------------------------ client-batch: the shared adapter

    def joint_forward(self, number: int, span: tuple[int, int], inputs: torch.Tensor, pad: torch.Tensor):
        """A client-batch round's forward through the shared adapter on this stage's part of ``span``;
        the graph is kept until :meth:`joint_backward` (or a new round clears it)."""
        x = inputs.to(device=self.pool.device, dtype=self.pool.dtype).detach().requires_grad_()
        self.pool.activate(SHARED_ADAPTER)
        out = self.body(x, pad.to(self.pool.device), None, 0, span=span)
        self.rounds[number] = (x, out, (inputs.device, inputs.dtype))
        return out.detach().to(device=inputs.device, dtype=inputs.dtype)

    def joint_backward(self, number: int, grad: torch.Tensor) -> torch.Tensor:
        x, out, (device, dtype) = self.rounds.pop(number)
        out.backward(grad.to(device=out.device, dtype=out.dtype))
        return x.grad.to(device=device, dtype=dtype)

    def shared_grad_norm_sq(self) -> float:
        grads = [p.grad for p in self.pool.parameters(SHARED_ADAPTER) if p.grad is not None]
        return float(sum(g.detach().float().pow(2).sum() for g in grads)) if grads else 0.0

    def shared_step(self, clip_norm: float, total_norm: float, lr: float, warmup: int, decay: float) -> None:
        """One AdamW step of the shared adapter's slice on this stage (the optimiser made at the first)."""
        params = self.pool.parameters(SHARED_ADAPTER)
        if not params:
            return
        if self.shared_optimizer is None:
            self.shared_optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=decay, foreach=True)
        if clip_norm > 0:
            coef = min(1.0, clip_norm / (total_norm + 1e-6))
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        warm_up(self.shared_optimizer, lr, warmup)
        self.shared_optimizer.step()
        self.shared_optimizer.zero_grad(set_to_none=True)

    def shared_zero_grad(self) -> None:
        """Rounds retired: free their graphs and drop the gradient they accumulated."""
        self.rounds.clear()
        for p in self.pool.parameters(SHARED_ADAPTER):
            p.grad = None

    def shared_reset(self) -> None:
        """The federation ended: forget the shared adapter and its optimiser."""
        self.rounds.clear()
        self.shared_optimizer = None
        if SHARED_ADAPTER in self.pool.settings:
            self.pool.delete(SHARED_ADAPTER)

    def average(self, sids: list[str], weights: list[float]) -> int:
        """server-hierarchical: FedAvg of these sessions' replicas, each layer of this stage over the
        replicas that train it (sessions this stage does not hold are left out); how many took part."""
        from .coordination.hierarchical import average_replicas

        held = [(self.sessions[sid], w) for sid, w in zip(sids, weights) if sid in self.sessions]
        if held:
            average_replicas(self.pool, [s for s, _ in held], [w for _, w in held])
        return len(held)

    def close(self, sid: str) -> None:
        self.latest.pop(sid, None)
        session = self.sessions.pop(sid, None)
        if session is not None:
            session.close()


_DECODE = "decode"  # a job of the stage's compute thread that joins the continuous batch


class StageActor(StageWorker):
    """The Ray actor of a stage: :class:`StageWorker` with its compute on one thread of its own.

    Ray runs the actor's calls on many threads (``max_concurrency``), so calls of different
    sessions arrive while the stage computes; each is handed to the one compute thread, in
    order. Decode steps (one token per row) that queued up meanwhile run as one batch
    (:func:`~fedsplit.server.batching.run_batch`, the one-process server's continuous batching):
    stage 1 batches the next steps of B and C while stage 2 runs A's.
    """

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.decode_batches = self.decode_rows = 0  # decode batches run, and the session steps in them
        threading.Thread(target=self._work, name="stage-compute", daemon=True).start()

    def describe(self) -> dict:
        return {**super().describe(), "decode_batches": self.decode_batches, "decode_rows": self.decode_rows}

    def _run(self, fn, *args):
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, args, future))
        return future.result()

    def forward(self, sid, step_id, hidden, pad, offset, keep_graph, use_cache):
        session = self.sessions.get(sid)
        if use_cache and hidden.shape[1] == 1 and session is not None and session.config.mode == "generate":
            return self._run(_DECODE, sid, hidden, pad, offset)
        return self._run(StageWorker.forward, self, sid, step_id, hidden, pad, offset, keep_graph, use_cache)

    def _work(self) -> None:
        while True:
            jobs = [self._jobs.get()]
            while True:
                try:
                    jobs.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            # Each session has at most one call in flight per stage, so running the decode steps
            # first reorders only calls of different sessions.
            decode = [(args, future) for fn, args, future in jobs if fn is _DECODE]
            if decode:
                self._decode_batch(decode)
            for fn, args, future in jobs:
                if fn is _DECODE:
                    continue
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - the caller's to raise
                    future.set_exception(exc)

    def _decode_batch(self, jobs) -> None:
        from .batching import run_batch

        items, waiting = [], []
        for (sid, hidden, pad, offset), future in jobs:
            try:
                session = self._session(sid)
                latest = self.latest.get(sid)
                if latest is not None and latest[:2] == (offset, 1) and session.cache.length == offset + 1:
                    future.set_result(latest[2])  # a retry of a step this stage ran already
                    continue
                caller = (hidden.device, hidden.dtype)
                on_body = session.to_body(hidden, pad)
                items.append((session, *on_body, offset))
                waiting.append((future, sid, offset, caller))
            except BaseException as exc:  # noqa: BLE001 - the caller's to raise
                future.set_exception(exc)
        results = run_batch(items) if items else []
        self.decode_batches += bool(items)
        self.decode_rows += len(items)
        for (future, sid, offset, caller), result in zip(waiting, results):
            if isinstance(result, Exception):
                future.set_exception(result)
                continue
            out = result.to(device=caller[0], dtype=caller[1])
            self.latest[sid] = (offset, 1, out)
            future.set_result(out)


def _on_compute_thread(name: str):
    method = getattr(StageWorker, name)

    @functools.wraps(method)
    def call(self, *args):
        return self._run(method, self, *args)

    return call


for _name in (
    "open",
    "backward",
    "grad_norm_sq",
    "step",
    "adapter_grads",
    "adapter_state",
    "put_adapter",
    "memory_bytes",
    "restore",
    "save",
    "joint_forward",
    "joint_backward",
    "shared_grad_norm_sq",
    "shared_step",
    "shared_zero_grad",
    "shared_reset",
    "average",
    "close",
):
    setattr(StageActor, _name, _on_compute_thread(_name))


# ---------------------------------------------------------------------------------------- front end


class StageFailed(Exception):
    """A stage actor died (or restarted and lost the session) during a call."""


def _ray():
    try:
        import ray
    except ImportError:
        raise ValueError(RAY_MISSING) from None
    return ray


def _translate(exc: BaseException) -> BaseException:
    """The exception a failed stage call stands for at the front end."""
    ray = _ray()
    lost = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause
        while isinstance(cause, ray.exceptions.RayTaskError):  # a later stage's argument failed
            cause = cause.cause
        if isinstance(cause, lost):  # an earlier stage died under the call
            return StageFailed(str(cause).splitlines()[0] if str(cause) else type(cause).__name__)
        if isinstance(cause, SessionError):
            return SessionError(cause.code, cause.message)
        if isinstance(cause, StageLostSession):
            return StageFailed(str(cause))
        if isinstance(cause, (ValueError, KeyError)):
            return ValueError(str(cause))
        return RuntimeError(f"a body stage failed: {cause!r}")
    if isinstance(exc, lost):
        return StageFailed(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return exc


async def _get(ref) -> Any:
    try:
        return await ref
    except Exception as exc:  # noqa: BLE001 - translated, or re-raised as it is
        raise _translate(exc) from None


@dataclasses.dataclass
class Stage:
    """The front end's handle on one stage actor."""

    index: int
    span: tuple[int, int]
    actor: Any
    incarnation: str = ""
    device: str = "cpu"
    dtype: str = "float32"
    budget: int = 0

    async def alive(self, timeout: float = STAGE_READY_TIMEOUT) -> str:
        """Wait until the actor answers (Ray restarts a dead one); its incarnation."""
        deadline = time.monotonic() + timeout
        delay = 0.1
        while True:
            try:
                self.incarnation = await _get(self.actor.ping.remote())
                return self.incarnation
            except StageFailed:
                if time.monotonic() > deadline:
                    raise SessionError(
                        "UNAVAILABLE", f"body stage {self.index} (layers {self.span}) did not come back"
                    ) from None
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)


def connect_ray(address: str | None) -> bool:
    """Join the Ray cluster at ``address`` (or start a local instance); True if this call started Ray.

    Missing or unreachable Ray is a ValueError/ConnectionError with one line.
    """
    ray = _ray()
    if ray.is_initialized():
        return False
    if address and address != "auto" and not address.startswith("ray://"):
        _check_reachable(address)  # Ray itself would retry an unreachable head for minutes
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        else:
            ray.init(
                num_cpus=os.cpu_count() or 1,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
    except (ConnectionError, TimeoutError, RuntimeError) as exc:
        where = f"at {address}" if address else "locally"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConnectionError(f"cannot reach the Ray cluster {where}: {first}") from None
    return True


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """ConnectionError (one line) unless a TCP connection to ``HOST:PORT`` opens within ``timeout``."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--ray-address takes auto or HOST:PORT (the Ray head's GCS port), not {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


def start_stages(
    config: ServerConfig, fingerprint: str, spans: list[tuple[int, int]], threads: int = 0
) -> list[Stage]:
    """Create one actor per stage span and wait until each has loaded its layers."""
    ray = _ray()
    resources = ray.cluster_resources()
    # One GPU per stage when the cluster has GPUs (unless --device cpu); CPU otherwise.
    gpus = resources.get("GPU", 0) >= 1 and config.device != "cpu"
    device = "cuda" if gpus else config.device  # the one GPU Ray gives the actor is its cuda:0
    # Stages compute on their own threads (``threads``, default: the node's cores shared by the
    # stages); the small CPU request only places them, spread over the cluster's nodes.
    options: dict[str, Any] = {
        "max_restarts": STAGE_MAX_RESTARTS,
        "max_task_retries": 0,
        "num_cpus": STAGE_CPUS,
        "scheduling_strategy": "SPREAD",
        "max_concurrency": STAGE_CONCURRENCY,  # calls wait on the stage's one compute thread
    }
    if gpus:
        options["num_gpus"] = 1
    threads = threads or max(1, (os.cpu_count() or 1) // len(spans))
    remote = ray.remote(StageActor).options(**options)
    stages = []
    for index, span in enumerate(spans):
        actor = remote.remote(
            index,
            config.model,
            span,
            device,
            config.dtype,
            threads,
            fingerprint,
            config.checkpoint_dir,
            config.checkpoint_keep,
            config.max_graphs,
            config.graph_ttl,
        )
        stages.append(Stage(index, span, actor))
    try:
        described = ray.get([s.actor.describe.remote() for s in stages], timeout=STAGE_READY_TIMEOUT)
    except ray.exceptions.GetTimeoutError:
        for s in stages:
            ray.kill(s.actor, no_restart=True)
        raise ConnectionError(
            f"the {len(stages)} body stages did not start within {STAGE_READY_TIMEOUT:.0f}s: does the Ray "
            f"cluster have {'a GPU' if gpus else 'CPU'} free for each (resources: {resources})?"
        ) from None
    except ray.exceptions.RayError as exc:
        for s in stages:
            ray.kill(s.actor, no_restart=True)
        raise ValueError(f"a body stage failed to start: {_translate(exc)}") from None
    for stage, info in zip(stages, described):
        stage.incarnation, stage.device, stage.dtype, stage.budget = (
            info["incarnation"],
            info["device"],
            info["dtype"],
            info["budget"],
        )
        log.info("stage %d: layers %d:%d on %s (%s)", stage.index, *stage.span, stage.device, stage.dtype)
    return stages


_ids = itertools.count(1)


@dataclasses.dataclass
class _Part:
    """A session's slice on one stage: the stage and the layers of the session's span it holds."""

    stage: Stage
    span: tuple[int, int]
    incarnation: str


class StagedSession:
    """A session whose body span runs through the stages: the interface of :class:`BodySession`,
    async (the front end awaits the stages), with the attributes the service and its audit read."""

    cache = None  # the KV cache lives on the stages (check_inputs then skips its position check)

    def __init__(self, stages: list[Stage], config: SessionConfig, owner: str) -> None:
        check_session_config(config, (stages[0].span[0], stages[-1].span[1]))
        start, end = config.span
        self.id = f"s{next(_ids)}-{owner}"
        self.owner, self.config = owner, config
        self.parts = [
            _Part(s, (max(start, s.span[0]), min(end, s.span[1])), s.incarnation)
            for s in stages
            if max(start, s.span[0]) < min(end, s.span[1])
        ]
        if not self.parts:  # an empty span: the stage where it sits runs no layers
            stage = next(s for s in stages if s.span[0] <= start <= s.span[1])
            self.parts = [_Part(stage, (start, start), stage.incarnation)]
        self.adapter: str | None = config.adapter or (
            f"session_{self.id}" if config.mode == "train" else None
        )
        self.optimizer = None  # each stage steps its own slice
        self.graphs: dict[int, Any] = {}  # pending graphs live on the stages
        self.last_used = time.monotonic()
        self.steps = 0
        self.run_id: str | None = config.run_id
        self.saved_step: int | None = None
        self.attached = False
        self.resumed = False
        from ..wire import codec

        self.wire_dtype: str = codec.DEFAULT_WIRE_DTYPE
        # generate: per part, the inputs (tensor or object ref, pads, offset) of every cached forward,
        # replayed into a restarted stage to rebuild its slice of the KV cache
        self.sent: list[list[tuple[Any, torch.Tensor, int]]] = [[] for _ in self.parts]
        self.hidden_size = 0  # set by open()

    check_inputs = BodySession.check_inputs  # shapes and limits; the stages check the cache position

    def _sub(self, part: _Part) -> SessionConfig:
        return dataclasses.replace(self.config, span=part.span, resume_steps=())

    async def open(self, hidden_size: int) -> None:
        """Open the session's slice on each of its stages (waiting for a restarting stage once)."""
        self.hidden_size = hidden_size
        for attempt in range(2):
            refs = [p.stage.actor.open.remote(self.id, self.owner, self._sub(p)) for p in self.parts]
            try:
                for part, ref in zip(self.parts, refs):
                    part.incarnation = await _get(ref)
                return
            except StageFailed as exc:
                if attempt:
                    await self.close()
                    raise SessionError("UNAVAILABLE", f"a body stage is unavailable ({exc}); retry") from None
                for part in self.parts:
                    await part.stage.alive()
            except BaseException:
                await self.close()
                raise

    # ------------------------------------------------------------------ forward and backward

    async def forward(
        self,
        step_id: int,
        hidden: torch.Tensor,
        pad_lengths: torch.Tensor,
        offset: int = 0,
        keep_graph: bool = True,
        use_cache: bool = True,
    ) -> torch.Tensor:
        self.last_used = time.monotonic()
        hidden, pad_lengths = hidden.cpu(), pad_lengths.cpu()
        if self.config.mode == "generate" and use_cache:
            return await self._cached_forward(step_id, hidden, pad_lengths, offset)
        try:
            return await _get(self._chain(step_id, hidden, pad_lengths, offset, keep_graph, use_cache))
        except StageFailed as exc:
            raise self._lost(exc) from None

    def _chain(self, step_id, hidden, pad, offset, keep_graph, use_cache, record: bool = False):
        """Submit the forward to every part in order, each taking the previous one's output ref."""
        ref = hidden
        for k, part in enumerate(self.parts):
            if record:
                self.sent[k].append((ref, pad, offset))
            ref = part.stage.actor.forward.remote(self.id, step_id, ref, pad, offset, keep_graph, use_cache)
        return ref

    async def _cached_forward(self, step_id, hidden, pad, offset) -> torch.Tensor:
        for attempt in range(REPLAY_ATTEMPTS + 1):
            done = len(self.sent[0])
            try:
                return await _get(self._chain(step_id, hidden, pad, offset, True, True, record=True))
            except StageFailed as exc:
                for sent in self.sent:
                    del sent[done:]  # this step's inputs: sent again by the retry
                if attempt == REPLAY_ATTEMPTS:
                    raise SessionError(
                        "UNAVAILABLE", f"body stages keep failing ({exc}); re-open the session"
                    ) from None
                log.warning("session %s: a body stage failed (%s); replaying into it", self.id, exc)
                await self._replay()
        raise AssertionError("unreachable")

    async def _replay(self) -> None:
        """Re-open the session on every stage that restarted and re-send what it had been sent."""
        for k, part in enumerate(self.parts):
            incarnation = await part.stage.alive()
            if incarnation == part.incarnation:
                continue
            actor = part.stage.actor
            incarnation = await _get(actor.open.remote(self.id, self.owner, self._sub(part)))
            for ref, pad, offset in self.sent[k]:
                await _get(actor.forward.remote(self.id, 0, ref, pad, offset, True, True))
            part.incarnation = incarnation
            log.info("session %s: replayed %d step(s) into stage %d", self.id, len(self.sent[k]), k)

    def _lost(self, exc: StageFailed) -> SessionLost:
        self.saved_step = None  # the stages disagree now: nothing of this session may be saved
        return SessionLost(
            f"a body stage of this session restarted ({exc}); open the session again"
            + (" (the run resumes from its latest checkpoint)" if self.run_id else "")
        )

    async def backward(self, step_id: int, grad: torch.Tensor) -> torch.Tensor:
        self.last_used = time.monotonic()
        ref = grad.cpu()
        for part in reversed(self.parts):
            ref = part.stage.actor.backward.remote(self.id, step_id, ref)
        try:
            return await _get(ref)
        except StageFailed as exc:
            raise self._lost(exc) from None

    async def step(self, clip_norm: float = 0.0, checkpoint: bool = False) -> None:
        if self.config.mode != "train":
            raise SessionError("FAILED_PRECONDITION", "optimizer step on a generate session")
        try:
            total = 0.0
            if clip_norm > 0:
                squares = [p.stage.actor.grad_norm_sq.remote(self.id) for p in self.parts]
                total = math.sqrt(sum([await _get(ref) for ref in squares]))
            refs = [p.stage.actor.step.remote(self.id, clip_norm, total) for p in self.parts]
            for ref in refs:
                await _get(ref)
        except StageFailed as exc:
            raise self._lost(exc) from None
        self.steps += 1

    # ------------------------------------------------------------------ adapters

    async def each(self, method: str, *args) -> list:
        """``StageWorker.method(id, *args)`` on every stage of the session, at once; their results."""
        refs = [getattr(p.stage.actor, method).remote(self.id, *args) for p in self.parts]
        try:
            return [await _get(ref) for ref in refs]
        except StageFailed as exc:
            raise self._lost(exc) from None

    async def adapter_state(self) -> tuple[LoraSettings, dict[str, torch.Tensor]]:
        if self.adapter is None:
            raise SessionError("FAILED_PRECONDITION", "this session has no body adapter")
        settings, state = None, {}
        for part_settings, part_state in await self.each("adapter_state"):
            settings = settings or part_settings
            state.update(part_state)
        return settings, state

    async def adapter_grads(self) -> dict[str, torch.Tensor]:
        grads: dict[str, torch.Tensor] = {}
        for part in await self.each("adapter_grads"):
            grads.update(part)
        return grads

    async def put_adapter(self, settings: LoraSettings, state: dict[str, torch.Tensor]) -> None:
        shares: list[dict[str, torch.Tensor]] = [{} for _ in self.parts]
        for key, value in state.items():
            parts = key.split(".")
            layer = int(parts[1]) if len(parts) > 1 and parts[0] == "layers" and parts[1].isdigit() else -1
            k = next((k for k, p in enumerate(self.parts) if p.span[0] <= layer < p.span[1]), None)
            if k is None:
                raise SessionError(
                    "INVALID_ARGUMENT",
                    f"adapter weight {key} is outside the session's body span {list(self.config.span)}",
                )
            shares[k][key] = value
        refs = [
            p.stage.actor.put_adapter.remote(self.id, settings, share) for p, share in zip(self.parts, shares)
        ]
        try:
            for ref in refs:
                await _get(ref)
        except StageFailed as exc:
            raise self._lost(exc) from None
        if self.adapter is None:
            self.adapter = f"session_{self.id}"

    async def memory_bytes(self) -> int:
        return sum(await self.each("memory_bytes"))

    async def close(self) -> None:
        self.sent = [[] for _ in self.parts]
        for part in self.parts:
            try:
                await _get(part.stage.actor.close.remote(self.id))
            except (StageFailed, SessionError):  # a restarted stage holds nothing of it anyway
                pass


class StagedRuns:
    """:class:`RunCheckpoints` for staged sessions: every stage saves and restores its own slice."""

    def __init__(self, root: str | None, every: int, keep: int) -> None:
        self.root, self.every, self.keep = root, every, keep
        self.saved = 0
        self.find_live = RunCheckpoints(None).find_live

    @property
    def enabled(self) -> bool:
        return self.root is not None

    async def restore(self, session: StagedSession, resume_steps: list[int]) -> int:
        have = {0}
        if self.enabled:
            per_stage = await asyncio.gather(
                *[_get(p.stage.actor.run_steps.remote(session.owner, session.run_id)) for p in session.parts]
            )
            have |= set.intersection(*(set(steps) for steps in per_stage))
        candidates = have & set(resume_steps) if resume_steps else have
        if not candidates:
            raise SessionError(
                "FAILED_PRECONDITION",
                f"run {session.run_id!r}: no step in common — the client holds checkpoints for "
                f"{sorted(resume_steps)}, every body stage for {sorted(have)}; resume the client from one "
                "of those or start over (include step 0)",
            )
        step = max(candidates)
        await session.each("restore", step)
        session.steps = session.saved_step = step
        session.resumed = step > 0
        log.info("run %s of %s starts at step %d on every stage", session.run_id, session.owner, step)
        return step

    async def save(self, session: StagedSession) -> bool:
        if not self.enabled or session.run_id is None or session.saved_step is None:
            return False
        try:
            saved = all(await session.each("save"))
        except (SessionLost, SessionError):
            log.exception("checkpoint of run %s failed", session.run_id)
            return False
        if saved:
            session.saved_step = session.steps
            self.saved += 1
        return saved

    async def after_step(self, session: StagedSession, requested: bool) -> bool:
        if session.run_id is None:
            return False
        due = self.every > 0 and session.steps % self.every == 0
        return await self.save(session) if (requested or due) else False

    async def save_if_dirty(self, session: StagedSession) -> bool:
        saved = session.saved_step
        if session.run_id is None or saved is None or saved == session.steps:
            return False
        return await self.save(session)

    async def save_all(self, sessions: list[StagedSession]) -> int:
        return sum([await self.save_if_dirty(s) for s in sessions])


class StageFront(nn.Module):
    """What the front end knows of the body it does not hold: the held span and the model config."""

    def __init__(self, config, stages: list[Stage], parameters: int) -> None:
        super().__init__()
        self.config = config
        self.stages = stages
        self.span = (stages[0].span[0], stages[-1].span[1])
        self.parameter_count = parameters


class _PipelinedDecoder:
    """Decode steps of a staged server: each session's step goes down the stages on its own
    coroutine, so sessions pipeline through the stages (no cross-session batch yet)."""

    async def submit(self, session: StagedSession, hidden, pad, offset):
        return await session.forward(0, hidden, pad, offset)


class StagedHierarchical(ServerHierarchical):
    """server-hierarchical on stages: a body replica per client, FedAvg every ``sync_every`` steps.

    Each client's forward goes down the stages on its own (the one-process server runs the
    forwards that queue together as one joint pass; here sessions pipeline through the stages
    instead); each stage averages its slice of the replicas at a sync.
    """

    async def forward(self, session, step_id, hidden, pad, offset):
        if session.config.mode != "train" or session.adapter is None:
            return await Coordinator.forward(self, session, step_id, hidden, pad, offset)
        session.check_inputs(hidden, pad, offset)
        if offset != 0:
            raise SessionError(
                "INVALID_ARGUMENT",
                "server-hierarchical training runs whole sequences: position_offset must be 0",
            )
        out = await session.forward(step_id, hidden, pad, 0)
        self.alone += 1
        self.examples[session.id] = self.examples.get(session.id, 0) + int(hidden.shape[0])
        return out

    async def _average(self, rnd: int, members: dict) -> dict:
        self.barriers.pop(rnd, None)
        self.last_round = max(self.last_round, rnd)
        sids = list(members)
        weights = [float(self.examples.get(sid, 0)) for sid in sids]
        stages = {part.stage.index: part.stage for session in members.values() for part in session.parts}
        for stage in stages.values():
            await _get(stage.actor.average.remote(sids, weights))
        for sid in members:
            self.examples[sid] = 0
        self.syncs += 1
        log.info("body sync round %d: averaged %d replica(s) on %d stage(s)", rnd, len(members), len(stages))
        return {sid: None for sid in members}


class StagedClientBatch(ClientBatch):
    """client-batch on stages: each round's forwards run as one batch down the stages through the
    shared adapter, its gradients as one backward up them, and each stage steps its slice of the
    shared adapter with an optimiser of its own (the gradient clip is over all stages)."""

    decay = 0.0  # the shared optimiser's weight decay, from its first session (as its lr)

    def attach(self, session) -> None:
        Coordinator.attach(self, session)
        if self.shared(session) and self.schedule == (0.0, 0):
            self.schedule = (session.config.lr, session.config.warmup_steps)
            self.decay = session.config.weight_decay

    def reset(self) -> None:
        super().reset()
        self.schedule = (0.0, 0)
        for stage in self.host.stages:  # after the sessions' closes queued before
            self.host.submit(lambda actor=stage.actor: _get(actor.shared_reset.remote()))

    def _stages(self, span: tuple[int, int]) -> list[tuple[Stage, tuple[int, int]]]:
        return [
            (s, (max(span[0], s.span[0]), min(span[1], s.span[1])))
            for s in self.host.stages
            if max(span[0], s.span[0]) < min(span[1], s.span[1])
        ]

    async def zero_grad(self) -> None:
        for stage in self.host.stages:
            await _get(stage.actor.shared_zero_grad.remote())

    async def _joint_forward(self, number: int, span: tuple[int, int], members: dict):
        longest = max(item[2].shape[1] for item in members.values())
        hidden, pad, slots, row = [], [], {}, 0
        for sid, (session, step_id, h, p) in members.items():
            extra = longest - h.shape[1]
            hidden.append(torch.nn.functional.pad(h.cpu(), (0, 0, extra, 0)))
            pad.append(p.cpu().to(torch.long) + extra)
            slots[sid] = Slot(session, step_id, slice(row, row + h.shape[0]), h.shape[1])
            row += h.shape[0]
        ref, pads = torch.cat(hidden), torch.cat(pad)
        stages = self._stages(span)
        for stage, part in stages:
            ref = stage.actor.joint_forward.remote(number, part, ref, pads)
        try:
            out = await _get(ref)
        except StageFailed as exc:
            raise SessionLost(f"a body stage restarted during client-batch round {number} ({exc})") from None
        rnd = Round(number, span, None, None, slots)
        rnd.stages, rnd.shape = stages, out.shape  # what the round's backward needs
        self.rows += row
        self.members += len(members)
        return rnd, {sid: out[s.rows, longest - s.length :] for sid, s in slots.items()}

    async def _joint_backward(self, rnd: Round, items: dict) -> dict:
        total = sum(w for _, w in items.values())
        shares = {sid: w / total if total > 0 else 1.0 / len(items) for sid, (_, w) in items.items()}
        full = torch.zeros(rnd.shape)
        for sid, (grad, _) in items.items():
            slot = rnd.slots[sid]
            full[slot.rows, full.shape[1] - slot.length :] = grad.cpu().to(full.dtype) * shares[sid]
        ref = full
        for stage, _part in reversed(rnd.stages):
            ref = stage.actor.joint_backward.remote(rnd.number, ref)
        try:
            grad_in = await _get(ref)
        except StageFailed as exc:
            raise SessionLost(
                f"a body stage restarted during client-batch round {rnd.number} ({exc})"
            ) from None
        results = {}
        for sid in items:
            slot, share = rnd.slots[sid], shares[sid]
            part = grad_in[slot.rows, grad_in.shape[1] - slot.length :]
            results[sid] = part / share if share > 0 else torch.zeros_like(part)
        return results

    async def _apply(self, clip: float) -> None:
        total = 0.0
        if clip > 0:
            squares = [stage.actor.shared_grad_norm_sq.remote() for stage in self.host.stages]
            total = math.sqrt(sum([await _get(ref) for ref in squares]))
        lr, warmup = self.schedule
        refs = [
            stage.actor.shared_step.remote(clip, total, lr, warmup, self.decay) for stage in self.host.stages
        ]
        for ref in refs:
            await _get(ref)
        self.updates += 1


class StagedServicer(SplitServicer):
    """The gRPC front end of a body split into Ray stages (see the module docstring)."""

    def __init__(
        self,
        body: StageFront,
        config: ServerConfig,
        fingerprint: str,
        tokens=None,
        executor=None,
        owns_ray: bool = False,
    ) -> None:
        super().__init__(body, config, fingerprint, tokens, executor)
        self.stages = body.stages
        self.owns_ray = owns_ray
        self.dtype = getattr(torch, self.stages[0].dtype)
        self.device = torch.device("cpu")  # wire tensors are decoded here, then travel to the stages
        self.memory_budget = (
            int(config.memory_budget)
            if config.memory_budget is not None
            else sum(s.budget for s in self.stages)
        )
        self.max_adapter_elements = body.parameter_count
        self.runs = StagedRuns(config.checkpoint_dir, config.checkpoint_every, config.checkpoint_keep)
        self.batcher = _PipelinedDecoder()
        self._queue: asyncio.Task | None = None
        if config.mode == "server-hierarchical":
            self.coordinator = StagedHierarchical(self)
        elif config.mode == "client-batch":
            self.coordinator = StagedClientBatch(self)

    async def new_session(self, config: SessionConfig, owner: str) -> StagedSession:
        if self._queue is not None:  # closes queued before (a run's adapter is freed, then re-made)
            await asyncio.wait([self._queue])
        session = StagedSession(self.stages, config, owner)
        await session.open(int(self.body.config.hidden_size))
        return session

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``: the session calls are coroutines that await the stages (nothing computes here)."""
        result = fn(*args)
        if inspect.isawaitable(result):
            result = await result
        return result

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` after the calls queued before it, without waiting."""
        previous = self._queue

        async def after() -> None:
            if previous is not None:
                await asyncio.wait([previous])
            try:
                await self.run(fn, *args)
            except Exception:  # noqa: BLE001 - background work: logged
                log.exception("background call %s failed", getattr(fn, "__name__", fn))

        self._queue = asyncio.get_running_loop().create_task(after())

    async def aclose(self) -> None:
        if self._queue is not None:
            await asyncio.wait([self._queue])
        await super().aclose()
        ray = _ray()
        for stage in self.stages:
            ray.kill(stage.actor, no_restart=True)
        if self.owns_ray:
            ray.shutdown()


def build_staged_servicer(config: ServerConfig, fingerprint: str, tokens, executor, threads: int = 0):
    """Connect to Ray (or start it), start the stage actors, and return the front end."""
    from ..model.loading import load_config
    from ..model.split import layer_parameter_counts, num_layers

    if config.mode not in STAGED_MODES:
        raise ValueError(
            f"--mode {config.mode} does not run with --stages yet: use --mode "
            f"{' or '.join(STAGED_MODES)}, or --stages 1"
        )
    model_config = load_config(config.model)
    held = config.layers or (0, num_layers(model_config))
    counts = layer_parameter_counts(config.model)
    spans = plan_stages(counts, held, config.stages, config.stage_layers)  # bad spans fail before Ray starts
    owns = connect_ray(config.ray_address)
    try:
        stages = start_stages(config, fingerprint, spans, threads)
    except BaseException:
        if owns:
            _ray().shutdown()
        raise
    front = StageFront(model_config, stages, sum(counts[held[0] : held[1]]))
    log.info("body in %d stages: %s", len(stages), _spans_text([s.span for s in stages]))
    return StagedServicer(front, config, fingerprint, tokens, executor, owns_ray=owns)
