"""The gRPC service: one bidirectional stream per session, body compute on one worker.

Every bad input gets a gRPC status code and a readable message; an error inside a
session's step comes back as an ``Error`` message and the session stays usable; an
error that makes the stream meaningless (auth, open) ends it with a status.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import torch
from google.protobuf.message import DecodeError

from ..model.lora import LoraSettings
from ..model.segments import Body
from ..wire import codec
from ..wire import fedsplit_pb2 as pb
from ..wire import fedsplit_pb2_grpc as pb_grpc
from ..wire.lora import lora_from_proto, lora_to_proto
from .adapters import AdapterPool
from .auth import TokenStore, bearer
from .batching import DecodeBatcher
from .checkpoint import RunCheckpoints, check_run_id, run_adapter_name
from .session import BodySession, SessionConfig, SessionError

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    """How the server runs; every field is a `fedsplit serve` option."""

    model: str = field(default="smollm2-135m", metadata={"help": "model spec"})
    layers: tuple[int, int] | None = field(default=None, metadata={"help": "decoder layers [a, b) held"})
    host: str = field(default="127.0.0.1", metadata={"help": "bind address"})
    port: int = field(default=7070, metadata={"help": "port (0 = any free port)"})
    memory_budget: int = field(
        default=4 << 30, metadata={"help": "bytes for session state (KV caches, graphs)"}
    )
    session_ttl: float = field(default=600.0, metadata={"help": "seconds before an idle session is evicted"})
    graph_ttl: float = field(default=300.0, metadata={"help": "seconds a forward waits for its backward"})
    max_graphs: int = field(default=16, metadata={"help": "pending training forwards per session"})
    max_message_bytes: int = field(
        default=codec.DEFAULT_MAX_MESSAGE_BYTES, metadata={"help": "largest message"}
    )
    checkpoint_dir: str | None = field(
        default=None,
        metadata={"help": "where training runs (OpenSession.run_id) are checkpointed; None = nowhere"},
    )
    checkpoint_every: int = field(
        default=100, metadata={"help": "checkpoint each run every K optimiser steps"}
    )
    checkpoint_keep: int = field(default=3, metadata={"help": "checkpoints kept per run"})
    mode: str = field(
        default="independent",
        metadata={
            "help": "training of many clients: independent | sequential | client-batch | server-hierarchical"
        },
    )
    sync_every: int = field(
        default=0,
        metadata={"help": "server-hierarchical: average the body replicas every R steps (0 = never)"},
    )
    fedavg_every: int = field(
        default=0,
        metadata={
            "help": "clients average their head/tail adapters every R "
            "steps (0 = never; server-hierarchical: sync_every)"
        },
    )
    round_timeout: float = field(default=30.0, metadata={"help": "seconds a round waits for missing clients"})
    gather_ms: float = field(
        default=250.0,
        metadata={
            "help": "server-hierarchical: how long a body pass waits "
            "for the forwards of clients about to send one (0 = none)"
        },
    )


async def _parsed(request_iterator, context):
    """The stream's requests; bytes that are not a ClientMessage end it with INVALID_ARGUMENT."""
    try:
        async for msg in request_iterator:
            yield msg
    except DecodeError as exc:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"request is not a fedsplit.v1.ClientMessage: {exc}"
        )


def _status(name: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, name, grpc.StatusCode.UNKNOWN)


class SplitServicer(pb_grpc.SplitServiceServicer):
    """Serves every session whose body span lies inside the held layers."""

    def __init__(
        self, body: Body, config: ServerConfig, fingerprint: str, tokens: TokenStore | None = None
    ) -> None:
        self.body, self.config, self.fingerprint, self.tokens = body, config, fingerprint, tokens
        self.pool = AdapterPool(body)
        self.sessions: dict[str, BodySession] = {}
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="body")
        self.batcher = DecodeBatcher(self.executor)
        self.stats = {"forward": 0, "backward": 0, "errors": 0, "batched_rows": 0}
        self._reserved: dict[str, int] = {}
        self.runs = RunCheckpoints(
            config.checkpoint_dir, config.checkpoint_every, config.checkpoint_keep, fingerprint
        )
        from ..federation.modes import make_coordinator  # many clients: fedsplit.federation

        self.coordinator = make_coordinator(self)

    # ------------------------------------------------------------------ helpers

    def info(self) -> pb.InfoReply:
        start, end = self.body.span
        return pb.InfoReply(
            model_fingerprint=self.fingerprint,
            model_name=self.config.model,
            held_start=start,
            held_end=end,
            hidden_size=int(self.body.config.hidden_size),
            num_layers=int(self.body.config.num_hidden_layers),
            wire_dtypes=[codec.wire_dtype_enum(d) for d in codec.WIRE_DTYPES],
            modes=[pb.TRAIN, pb.GENERATE],
            max_message_bytes=self.config.max_message_bytes,
            protocol_version=codec.PROTOCOL_VERSION,
            **self.coordinator.describe(),
        )

    async def _authenticate(self, context) -> str:
        if self.tokens is None:
            return "anonymous"
        client = self.tokens.client_for(bearer(context.invocation_metadata()))
        if client is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        return client

    def _kv_bytes(self, span: tuple[int, int], max_length: int, batch: int) -> int:
        cfg = self.body.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        per_token = 2 * (span[1] - span[0]) * cfg.num_key_value_heads * head_dim * 4
        return per_token * max_length * batch

    def _train_bytes(self, config: SessionConfig) -> int:
        """Rough reservation of a TRAIN session: adapter + grads + AdamW, and one pending graph."""
        cfg = self.body.config
        layers = config.span[1] - config.span[0]
        rank = (config.lora or LoraSettings()).rank
        adapter = layers * 4 * rank * 2 * cfg.hidden_size * 4 * 4  # ~4 targets, A+B, weight+grad+2 moments
        # autograd keeps ~ (6 hidden + 4 intermediate) floats per token per layer, plus attention scores
        per_token = (
            layers
            * (
                6 * cfg.hidden_size
                + 4 * cfg.intermediate_size
                + 2 * cfg.num_attention_heads * config.max_length
            )
            * 4
        )
        return adapter + per_token * config.max_length * config.max_batch

    def memory_in_use(self) -> int:
        return sum(self._reserved.values())

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ------------------------------------------------------------------ RPCs

    async def Info(self, request, context):
        await self._authenticate(context)
        return self.info()

    async def Session(self, request_iterator, context):
        owner = await self._authenticate(context)
        session: BodySession | None = None
        closed = False
        try:
            async for msg in _parsed(request_iterator, context):
                kind = msg.WhichOneof("kind")
                if kind == "open":
                    if session is not None:
                        await context.abort(
                            grpc.StatusCode.FAILED_PRECONDITION, "session already open on this stream"
                        )
                    session = await self._open(msg.open, owner, context)
                    session.attached = True
                    self.coordinator.attach(session)
                    yield pb.ServerMessage(
                        seq=msg.seq,
                        opened=pb.SessionOpened(
                            session_id=session.id,
                            span_start=session.config.span[0],
                            span_end=session.config.span[1],
                            info=self.info(),
                            resumed=getattr(session, "resumed", False),
                            step=getattr(session, "steps", 0),
                        ),
                    )
                    continue
                if session is None:
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "send OpenSession first")
                if kind == "close":
                    closed = True
                    break
                try:
                    reply = await self._handle(session, kind, msg)
                except (SessionError, codec.WireError) as exc:
                    self.stats["errors"] += 1
                    code = _status(exc.code) if isinstance(exc.code, str) else exc.code
                    reply = pb.ServerMessage(error=pb.Error(code=code.value[0], message=str(exc)))
                except Exception as exc:  # a check we lack: the session's state is suspect, so free it
                    log.exception("%s failed on %s of %s", kind, session.id, owner)
                    self.stats["errors"] += 1
                    closed = True
                    await context.abort(
                        grpc.StatusCode.INTERNAL,
                        f"the server failed on this {kind} ({exc}); the session is closed — open a new one",
                    )
                reply.seq = msg.seq
                yield reply
        finally:
            if session is not None:
                session.attached = False
                self.coordinator.detach(session)
                if closed:
                    self._close(session)
                else:  # the stream broke: keep the session for a resume until the TTL evicts it
                    session.last_used = time.monotonic()
                    log.info("parked %s of %s", session.id, owner)

    async def _open(self, req: pb.OpenSession, owner: str, context) -> BodySession:
        if req.HasField("resume_session_id"):
            return await self._resume(req.resume_session_id, owner, context)
        if req.model_fingerprint and req.model_fingerprint != self.fingerprint:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model mismatch: the server runs {self.config.model} (fingerprint {self.fingerprint}), "
                f"the client has {req.model_fingerprint}",
            )
        mode = {pb.TRAIN: "train", pb.GENERATE: "generate"}.get(req.mode)
        if mode is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "mode must be TRAIN or GENERATE")
        try:
            wire_dtype = codec.wire_dtype_name(req.wire_dtype) if req.wire_dtype else codec.DEFAULT_WIRE_DTYPE
        except codec.WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if req.max_length == 0 or req.max_length > 1 << 20:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_length must be between 1 and 1048576")
        span = (req.span_start, req.span_end)
        batch = req.max_batch_size or 1
        try:
            lora = lora_from_proto(req.lora) if req.HasField("lora") and req.lora.rank else None
        except codec.WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        for name in ("learning_rate", "weight_decay"):
            value = getattr(req, name)
            ok = math.isfinite(value) and 0 <= value < 1e3 and (value > 0 or name == "weight_decay")
            if req.HasField(name) and not ok:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{name} must be finite, below 1000 (learning_rate > 0, weight_decay >= 0)",
                )
        config = SessionConfig(
            span=span,
            mode=mode,
            max_length=req.max_length,
            max_batch=batch,
            lora=lora,
            lr=req.learning_rate if req.HasField("learning_rate") else 2e-4,
            weight_decay=req.weight_decay if req.HasField("weight_decay") else 0.0,
            warmup_steps=req.warmup_steps,
            seed=req.lora.seed if req.HasField("lora") and req.lora.HasField("seed") else None,
        )
        config = self.coordinator.prepare(config)
        if req.run_id:
            adopted = await self._open_run(req, owner, config, context)
            if adopted is not None:
                return adopted
        need = (
            self._kv_bytes(span, req.max_length, batch) if mode == "generate" else self._train_bytes(config)
        )
        if self.memory_in_use() + need > self.config.memory_budget:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"session needs {need / 2**20:.1f} MiB of KV cache; {self.memory_in_use() / 2**20:.1f} MiB "
                f"of the {self.config.memory_budget / 2**20:.1f} MiB budget is in use — retry later or lower max_length",
            )
        try:
            session = await self._run(
                lambda: BodySession(
                    self.body, self.pool, config, owner, self.config.max_graphs, self.config.graph_ttl
                )
            )
        except SessionError as exc:
            await context.abort(_status(exc.code), exc.message)
        except ValueError as exc:  # e.g. LoRA target modules the body does not have
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot create the session: {exc}")
        session.wire_dtype = wire_dtype
        self.sessions[session.id] = session
        self._reserved[session.id] = need
        if session.run_id:
            try:
                await self._run(self.runs.restore, session, list(req.resume_steps))
            except SessionError as exc:
                self._close(session)
                await context.abort(_status(exc.code), exc.message)
        log.info(
            "opened %s for %s: %s span %s max_length %d%s",
            session.id,
            owner,
            mode,
            span,
            req.max_length,
            f" lr {session.config.lr:g}" if mode == "train" else "",
        )
        return session

    async def _open_run(
        self, req: pb.OpenSession, owner: str, config: SessionConfig, context
    ) -> BodySession | None:
        """A named training run: re-attach its parked session if the client can continue from its step."""
        try:
            check_run_id(req.run_id)
        except SessionError as exc:
            await context.abort(_status(exc.code), exc.message)
        if config.mode != "train":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "run_id is for TRAIN sessions")
        if config.adapter is not None:  # a federation mode trains a shared adapter: not one client's run
            log.info(
                "run %s of %s trains the %s adapter of the %s mode; not checkpointed as a run",
                req.run_id,
                owner,
                config.adapter,
                self.coordinator.mode,
            )
            return None
        config.run_id, config.adapter = req.run_id, run_adapter_name(owner, req.run_id)
        live = self.runs.find_live(self.sessions, owner, req.run_id)
        if live is None:
            return None
        if getattr(live, "attached", False):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"run {req.run_id!r} is in use by another stream"
            )
        if not req.resume_steps or live.steps in req.resume_steps:
            live.resumed = live.steps > 0
            log.info("run %s of %s re-attached at step %d", req.run_id, owner, live.steps)
            return live
        self._close(live)  # the client goes back to an earlier step: restore it from disk
        return None

    async def _resume(self, session_id: str, owner: str, context) -> BodySession:
        """Re-attach a stream to a session parked when its previous stream broke."""
        session = self.sessions.get(session_id)
        if session is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no session {session_id!r} (closed or evicted)")
        if session.owner != owner:
            log.warning("client %s tried to use session %s of %s", owner, session_id, session.owner)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"session {session_id!r} belongs to another client"
            )
        if getattr(session, "attached", False):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"session {session_id!r} is in use by another stream"
            )
        session.resumed = True
        return session

    async def _handle(self, session: BodySession, kind: str, msg) -> pb.ServerMessage:
        hidden_size = session.hidden_size
        if kind == "forward":
            fwd = msg.forward
            rows = len(fwd.pad_lengths)
            stateful = fwd.keep_graph if session.config.mode == "train" else fwd.use_cache
            limit = (
                session.config.max_batch * session.config.max_length * hidden_size
                if stateful
                else self.config.max_message_bytes // 2
            )
            hidden = codec.decode_tensor(
                fwd.hidden, expect_shape=(rows, None, hidden_size), max_elements=limit
            )
            pad = torch.tensor(list(fwd.pad_lengths), dtype=torch.long)
            if session.config.mode == "generate" and fwd.use_cache and hidden.shape[1] == 1:
                out = await self.batcher.submit(session, hidden, pad, fwd.position_offset)
            elif session.config.mode == "train" and fwd.keep_graph:
                out = await self.coordinator.forward(session, fwd.step_id, hidden, pad, fwd.position_offset)
            else:
                out = await self._run(
                    session.forward,
                    fwd.step_id,
                    hidden,
                    pad,
                    fwd.position_offset,
                    fwd.keep_graph,
                    fwd.use_cache,
                )
            self.stats["forward"] += 1
            return pb.ServerMessage(
                forward_result=pb.ForwardResult(
                    step_id=fwd.step_id, hidden=codec.encode_tensor(out, session.wire_dtype)
                )
            )
        if kind == "backward":
            bwd = msg.backward
            grad = codec.decode_tensor(
                bwd.grad,
                expect_shape=(None, None, hidden_size),
                max_elements=session.config.max_batch * session.config.max_length * hidden_size,
            )
            weight = bwd.loss_weight if bwd.HasField("loss_weight") else None
            grad_in = await self.coordinator.backward(session, bwd.step_id, grad, weight)
            self.stats["backward"] += 1
            return pb.ServerMessage(
                backward_result=pb.BackwardResult(
                    step_id=bwd.step_id, grad=codec.encode_tensor(grad_in, session.wire_dtype)
                )
            )
        if kind == "step":
            clip = msg.step.grad_clip_norm if msg.step.HasField("grad_clip_norm") else 0.0
            await self.coordinator.step(session, clip)
            saved = await self._run(self.runs.after_step, session, msg.step.checkpoint)
            return pb.ServerMessage(
                step_done=pb.StepDone(
                    step_id=msg.step.step_id,
                    stats={"step": float(session.steps), "checkpointed": float(saved)},
                )
            )
        if kind == "fetch_adapter":
            settings, state = await self._run(session.adapter_state)
            return pb.ServerMessage(
                adapter=pb.AdapterState(
                    lora=lora_to_proto(settings), tensors=codec.named_tensors(state, "fp32")
                )
            )
        if kind == "put_adapter":
            put = msg.put_adapter
            limit = sum(p.numel() for p in self.body.parameters())
            state = codec.from_named_tensors(put.tensors, max_elements=limit)
            await self._run(session.put_adapter, lora_from_proto(put.lora), state)
            return pb.ServerMessage(step_done=pb.StepDone())
        raise SessionError("INVALID_ARGUMENT", f"unexpected message {kind!r}")

    async def Adapters(self, request, context):
        """Head/tail FedAvg: answer each upload with the round's example-weighted average."""
        owner = await self._authenticate(context)
        try:
            return await self.coordinator.head_tail.upload(owner, request)
        except codec.WireError as exc:
            await context.abort(exc.code, exc.message)

    def _close(self, session: BodySession) -> None:
        self.sessions.pop(session.id, None)
        self._reserved.pop(session.id, None)
        self.executor.submit(self.runs.save_if_dirty, session)  # same worker, so before the close below
        self.executor.submit(session.close)
        log.info("closed %s", session.id)

    async def checkpoint_all(self) -> int:
        """Save every training run whose latest step is not on disk yet (SIGTERM)."""
        return await self._run(self.runs.save_all, list(self.sessions.values()))

    async def evict_idle(self) -> None:
        """Free sessions idle longer than the TTL (a client that vanished without closing)."""
        now = time.monotonic()
        for session in list(self.sessions.values()):
            if not getattr(session, "attached", False) and now - session.last_used > self.config.session_ttl:
                log.warning("evicting idle session %s of %s", session.id, session.owner)
                self._close(session)


async def start_server(
    servicer: SplitServicer, config: ServerConfig, tls_cert: str | None = None, tls_key: str | None = None
) -> tuple[grpc.aio.Server, int]:
    """Start serving; returns the server and the bound port."""
    # Keepalive pings find peers that vanished without closing their TCP connection (a host that
    # lost power); their streams then break, their sessions are parked and the TTL frees them.
    keepalive = [  # accept clients' pings too
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
    ]
    server = grpc.aio.server(options=codec.channel_options(config.max_message_bytes) + keepalive)
    pb_grpc.add_SplitServiceServicer_to_server(servicer, server)
    address = f"{config.host}:{config.port}"
    if tls_cert and tls_key:
        with open(tls_key, "rb") as k, open(tls_cert, "rb") as c:
            creds = grpc.ssl_server_credentials([(k.read(), c.read())])
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    await server.start()
    return server, port
