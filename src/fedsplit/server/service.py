"""The gRPC service: one bidirectional stream per session, body compute on one worker.

Every bad input gets a gRPC status code and a readable message; an error inside a
session's step comes back as an ``Error`` message and the session stays usable; an
error that makes the stream meaningless (auth, open) ends it with a status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import torch
from google.protobuf.message import DecodeError

from ..model.segments import Body
from ..wire import codec
from ..wire import fedsplit_pb2 as pb
from ..wire import fedsplit_pb2_grpc as pb_grpc
from ..wire.lora import lora_from_proto, lora_to_proto
from ..wire.protocol import SessionConfig
from .adapters import AdapterPool
from .audit_log import AuditLog, StreamRecord
from .auth import Authenticator, AuthError, Caller, TokenStore
from .batching import DecodeBatcher
from .checkpoint import RunCheckpoints, check_run_id, run_adapter_name
from .config import ServerConfig
from .coordination.factory import make_coordinator
from .opening import memory_needed, session_config, status_code
from .placement import resolve_memory_budget
from .quotas import TARPIT_MAX_S, ClientQuotas
from .session import BodySession, SessionError, SessionLost

log = logging.getLogger(__name__)


def body_worker() -> ThreadPoolExecutor:
    """The one thread that runs the body's compute (and should load it: see ``runner.build_servicer``).

    Measured on a 2-core CPU: once a second thread of a process has run parallel torch work (an
    OpenMP team of its own), decode steps on either thread take about twice as long. So every
    torch op of any size runs on this thread; the asyncio thread only moves bytes.
    """
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="body")


T = TypeVar("T")


async def _parsed(request_iterator, context):
    """The stream's requests; bytes that are not a ClientMessage end it with INVALID_ARGUMENT."""
    try:
        async for msg in request_iterator:
            yield msg
    except DecodeError as exc:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"request is not a fedsplit.v1.ClientMessage: {exc}"
        )


class SplitServicer(pb_grpc.SplitServiceServicer):
    """Serves every session whose body span lies inside the held layers.

    It is the coordinators' :class:`~fedsplit.server.coordination.base.BodyHost`: ``body``,
    ``pool``, ``config``, ``sessions``, and :meth:`run` / :meth:`submit` on the body worker.
    Tensors from the wire are decoded straight onto the body's ``device`` in its ``dtype``
    (:meth:`decode`); replies are encoded in each session's wire dtype, whatever the body's.
    """

    def __init__(
        self,
        body: Body,
        config: ServerConfig,
        fingerprint: str,
        tokens: TokenStore | None = None,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.body, self.config, self.fingerprint, self.tokens = body, config, fingerprint, tokens
        self.pool = AdapterPool(body)
        self.device, self.dtype = self.pool.device, self.pool.dtype
        # Resolved now that the body is loaded: on CUDA the default follows the GPU's free memory.
        self.memory_budget = resolve_memory_budget(config.memory_budget, self.device)
        self.sessions: dict[str, BodySession] = {}  # open sessions by id, attached or parked
        # One worker thread runs all body compute, in order: sessions share the weights and the pool.
        self.executor = executor or body_worker()
        self.batcher = DecodeBatcher(self.run)
        self.stats = {"forward": 0, "backward": 0, "errors": 0, "batched_rows": 0}
        # Callables ``observer(session, hidden, pad_lengths, offset)`` shown every hidden state a
        # client sends, as decoded: what a curious operator of this server can record. Used by
        # `fedsplit bench privacy --after-finetune` to attack exactly what arrived over gRPC.
        self.observers: list[Callable[[BodySession, torch.Tensor, torch.Tensor, int], None]] = []
        # Callables ``observer(session, grad)`` shown every gradient a client sends back in training,
        # as decoded (`fedsplit bench privacy --after-finetune --labels` attacks the labels in them).
        self.grad_observers: list[Callable[[BodySession, torch.Tensor], None]] = []
        self._reserved: dict[str, int] = {}
        # Safe exposure: who calls (bearer token and/or client certificate, re-checked when the token
        # file changes), per-client quotas (``client_*`` options) and the audit log (``--audit-log``).
        self.auth = Authenticator(tokens, mutual_tls=config.tls_client_ca is not None)
        self.quotas = ClientQuotas(config)
        self.audit = AuditLog(config.audit_log) if config.audit_log else None
        self._token_generation = tokens.generation if tokens is not None else 0
        self.runs = RunCheckpoints(
            config.checkpoint_dir, config.checkpoint_every, config.checkpoint_keep, fingerprint
        )
        self.coordinator = make_coordinator(self)  # how the body trains for many clients
        # Largest adapter a client may put (every weight of the held layers).
        self.max_adapter_elements = sum(p.numel() for p in body.parameters())

    # ------------------------------------------------------------------ helpers

    def info(self) -> pb.InfoReply:
        """What the server holds and speaks (the ``Info`` RPC, and part of ``SessionOpened``)."""
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

    async def _authenticate(self, context) -> Caller:
        try:
            caller = self.auth.identify(context.invocation_metadata(), context.auth_context())
        except AuthError as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        self._drop_revoked()
        return caller

    def memory_in_use(self) -> int:
        """Bytes reserved by the open sessions (checked against ``memory_budget`` at each open)."""
        return sum(self._reserved.values())

    def decode(self, msg: pb.Tensor, **checks: Any) -> torch.Tensor:
        """A hidden state or gradient from a client, checked (``codec.decode_tensor``'s ``checks``)
        and placed on the body's device in its dtype, whatever dtype it travelled in."""
        return codec.decode_tensor(msg, out_dtype=self.dtype, device=self.device, **checks)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the body worker, after the work handed over before it; its result."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` on the body worker without waiting for it."""
        self.executor.submit(fn, *args)

    async def new_session(self, config: SessionConfig, owner: str) -> BodySession:
        """A session over the held layers, created on the body worker (a staged server overrides it)."""
        return await self.run(
            lambda: BodySession(
                self.body, self.pool, config, owner, self.config.max_graphs, self.config.graph_ttl
            )
        )

    async def aclose(self) -> None:
        """Release the compute (after the streams are gone and the runs checkpointed)."""
        self.executor.shutdown(wait=True)

    # ------------------------------------------------------------------ RPCs

    async def Info(self, request, context):
        await self._authenticate(context)
        return self.info()

    async def Session(self, request_iterator, context):
        caller = await self._authenticate(context)
        owner = caller.client
        record = StreamRecord(owner)  # for the audit log
        session: BodySession | None = None
        closed = False
        try:
            async for msg in _parsed(request_iterator, context):
                if not self._still_valid(caller):  # its token was revoked since the last message
                    closed = True
                    await context.abort(
                        grpc.StatusCode.UNAUTHENTICATED,
                        f"the token of client {owner!r} was revoked; the session is closed",
                    )
                kind = msg.WhichOneof("kind")
                if kind == "open":
                    if session is not None:
                        await context.abort(
                            grpc.StatusCode.FAILED_PRECONDITION, "session already open on this stream"
                        )
                    async with self.quotas.opening(owner):  # the client's quota checks and its attach as one
                        session = await self._open(msg.open, owner, context)
                        session.attached = True
                    record.attach(session.id, session.config, session.resumed)
                    self._audit("open", client=owner, **record.session)
                    self.coordinator.attach(session)
                    yield pb.ServerMessage(
                        seq=msg.seq,
                        opened=pb.SessionOpened(
                            session_id=session.id,
                            span_start=session.config.span[0],
                            span_end=session.config.span[1],
                            info=self.info(),
                            resumed=session.resumed,
                            step=session.steps,
                        ),
                    )
                    continue
                if session is None:
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "send OpenSession first")
                if kind == "close":
                    closed = True
                    break
                try:
                    await self._charge(session, kind, msg)
                    reply = await self._handle(session, kind, msg)
                except (SessionError, codec.WireError) as exc:
                    self.stats["errors"] += 1
                    code = status_code(exc.code) if isinstance(exc.code, str) else exc.code
                    reply = pb.ServerMessage(error=pb.Error(code=code.value[0], message=str(exc)))
                except SessionLost as exc:  # a pipeline stage restarted: the session must be opened again
                    self.stats["errors"] += 1
                    closed = True
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
                except Exception as exc:  # a check we lack: the session's state is suspect, so free it
                    log.exception("%s failed on %s of %s", kind, session.id, owner)
                    self.stats["errors"] += 1
                    closed = True
                    await context.abort(
                        grpc.StatusCode.INTERNAL,
                        f"the server failed on this {kind} ({exc}); the session is closed — open a new one",
                    )
                reply.seq = msg.seq
                record.count(kind, msg, reply)
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
            self._audit_stream(record, session is not None, closed, context)

    async def _open(self, req: pb.OpenSession, owner: str, context) -> BodySession:
        attached, _ = self.client_usage(owner)
        refused = self.quotas.admit_stream(owner, attached)
        if refused:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
        if req.HasField("resume_session_id"):
            return await self._resume(req.resume_session_id, owner, context)
        try:
            config, wire_dtype = session_config(req, self.fingerprint, self.config.model)
        except SessionError as exc:
            await context.abort(status_code(exc.code), exc.message)
        config = self.coordinator.prepare(config)
        if req.run_id:
            adopted = await self._open_run(req, owner, config, context)
            if adopted is not None:
                return adopted
        need = memory_needed(self.body, config, self.dtype)
        if self.memory_in_use() + need > self.memory_budget:
            what = "KV cache" if config.mode == "generate" else "graph, adapter and optimiser memory"
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"session needs {need / 2**20:.1f} MiB of {what}; {self.memory_in_use() / 2**20:.1f} MiB "
                f"of the {self.memory_budget / 2**20:.1f} MiB budget is in use — retry later or lower max_length",
            )
        refused = self.quotas.admit_memory(owner, self.client_usage(owner)[1], need)
        if refused:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
        try:
            session = await self.new_session(config, owner)
        except SessionError as exc:
            await context.abort(status_code(exc.code), exc.message)
        except ValueError as exc:  # e.g. LoRA target modules the body does not have
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot create the session: {exc}")
        session.wire_dtype = wire_dtype
        self.sessions[session.id] = session
        self._reserved[session.id] = need
        if session.run_id:
            try:
                await self.run(self.runs.restore, session, list(req.resume_steps))
            except SessionError as exc:
                self._close(session)
                await context.abort(status_code(exc.code), exc.message)
        log.info(
            "opened %s for %s: %s span %s max_length %d%s",
            session.id,
            owner,
            config.mode,
            config.span,
            config.max_length,
            f" lr {session.config.lr:g}" if config.mode == "train" else "",
        )
        return session

    async def _open_run(
        self, req: pb.OpenSession, owner: str, config: SessionConfig, context
    ) -> BodySession | None:
        """A named training run: re-attach its parked session if the client can continue from its step."""
        try:
            check_run_id(req.run_id)
        except SessionError as exc:
            await context.abort(status_code(exc.code), exc.message)
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
        if live.attached:
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
        if session.attached:
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
            hidden = self.decode(fwd.hidden, expect_shape=(rows, None, hidden_size), max_elements=limit)
            pad = torch.tensor(list(fwd.pad_lengths), dtype=torch.long, device=self.device)
            for observe in self.observers:
                observe(session, hidden, pad, fwd.position_offset)
            if session.config.mode == "generate" and fwd.use_cache and hidden.shape[1] == 1:
                out = await self.batcher.submit(session, hidden, pad, fwd.position_offset)
            elif session.config.mode == "train" and fwd.keep_graph:
                out = await self.coordinator.forward(session, fwd.step_id, hidden, pad, fwd.position_offset)
            else:
                out = await self.run(
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
            grad = self.decode(
                bwd.grad,
                expect_shape=(None, None, hidden_size),
                max_elements=session.config.max_batch * session.config.max_length * hidden_size,
            )
            for observe in self.grad_observers:
                observe(session, grad)
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
            saved = await self.run(self.runs.after_step, session, msg.step.checkpoint)
            return pb.ServerMessage(
                step_done=pb.StepDone(
                    step_id=msg.step.step_id,
                    stats={"step": float(session.steps), "checkpointed": float(saved)},
                )
            )
        if kind == "fetch_adapter":
            settings, state = await self.run(session.adapter_state)
            return pb.ServerMessage(
                adapter=pb.AdapterState(
                    lora=lora_to_proto(settings), tensors=codec.named_tensors(state, "fp32")
                )
            )
        if kind == "put_adapter":
            put = msg.put_adapter
            state = codec.from_named_tensors(put.tensors, max_elements=self.max_adapter_elements)
            await self.run(session.put_adapter, lora_from_proto(put.lora), state)
            return pb.ServerMessage(step_done=pb.StepDone())
        raise SessionError("INVALID_ARGUMENT", f"unexpected message {kind!r}")

    async def Adapters(self, request, context):
        """Head/tail FedAvg: answer each upload with the round's example-weighted average."""
        owner = (await self._authenticate(context)).client
        try:
            return await self.coordinator.head_tail.upload(owner, request)
        except codec.WireError as exc:
            await context.abort(exc.code, exc.message)

    def _close(self, session: BodySession) -> None:
        self.sessions.pop(session.id, None)
        self._reserved.pop(session.id, None)
        self.submit(self.runs.save_if_dirty, session)  # same worker, so before the close below
        self.submit(session.close)
        log.info("closed %s", session.id)

    async def checkpoint_all(self) -> int:
        """Save every training run whose latest step is not on disk yet (SIGTERM)."""
        return await self.run(self.runs.save_all, list(self.sessions.values()))

    async def evict_idle(self) -> None:
        """Free sessions idle longer than the TTL (a client that vanished without closing)."""
        now = time.monotonic()
        for session in list(self.sessions.values()):
            if not session.attached and now - session.last_used > self.config.session_ttl:
                log.warning("evicting idle session %s of %s", session.id, session.owner)
                self._close(session)
                self._audit("evicted", client=session.owner, session=session.id, reason="ttl")
        if self.tokens is not None:  # a revocation frees parked sessions even when no call comes
            self.tokens.refresh()
            self._drop_revoked()

    # ------------------------------------------------------------------ safe exposure hooks

    def _still_valid(self, caller: Caller) -> bool:
        """Whether the caller of an open stream may go on (its token not revoked since it was checked)."""
        valid = self.auth.still_valid(caller)
        self._drop_revoked()
        return valid

    def _drop_revoked(self) -> None:
        """After the token file changed: free the parked sessions of clients that no longer hold a token.

        Attached sessions of such a client end at their next message (:meth:`_still_valid`).
        """
        if self.tokens is None or self.tokens.generation == self._token_generation:
            return
        self._token_generation = self.tokens.generation
        holders = self.tokens.clients
        for session in list(self.sessions.values()):
            if not session.attached and session.owner not in holders:
                log.warning(
                    "closing parked session %s of %s: its token was revoked", session.id, session.owner
                )
                self._close(session)
                self._audit("evicted", client=session.owner, session=session.id, reason="revoked")

    def client_usage(self, client: str) -> tuple[int, int]:
        """(sessions of ``client`` on open streams, bytes reserved by all its open sessions)."""
        attached = reserved = 0
        for session_id, session in self.sessions.items():
            if session.owner == client:
                attached += session.attached
                reserved += self._reserved.get(session_id, 0)
        return attached, reserved

    async def _charge(self, session: BodySession, kind: str, msg) -> None:
        """The client's rate quotas: a decode step costs its rows in tokens, an optimiser step one step.

        A refusal is held back for the wait it names (the tarpit, at most ``TARPIT_MAX_S``)."""
        if kind == "step":
            what, cost = "steps", 1
        elif kind == "forward" and session.config.mode == "generate" and msg.forward.use_cache:
            shape = msg.forward.hidden.shape
            what, cost = "tokens", (shape[0] if len(shape) == 3 and shape[1] == 1 else 0)
        else:
            return
        refused = self.quotas.charge(session.owner, what, cost)
        if refused:
            reason, wait = refused
            await asyncio.sleep(min(wait, TARPIT_MAX_S))
            raise SessionError("RESOURCE_EXHAUSTED", reason)

    def _audit(self, event: str, **fields: Any) -> None:
        """One audit-log line (if ``--audit-log``); a failing write is logged, never fatal to a session."""
        if self.audit is None:
            return
        try:
            self.audit.write(event, **fields)
        except (OSError, ValueError):
            log.exception("cannot write the audit log %s", self.audit.path)

    def _audit_stream(self, record: StreamRecord, opened: bool, closed: bool, context) -> None:
        """The audit line of a session stream that ended: ``close``, or ``refused`` if none opened."""
        code = context.code()
        aborted = code is not None and code != grpc.StatusCode.OK
        if opened:
            status = code.name if aborted else ("ok" if closed else "parked")
            self._audit("close", **record.fields(status))
        elif aborted:
            self._audit("refused", client=record.client, status=code.name, reason=context.details())
