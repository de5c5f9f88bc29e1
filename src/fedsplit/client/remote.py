"""The body behind gRPC: a session is one bidirectional stream to a fedsplit server."""

from __future__ import annotations

import logging
import queue
import time

import grpc
import torch

from ..wire import codec
from ..wire import fedsplit_pb2 as pb
from ..wire import fedsplit_pb2_grpc as pb_grpc
from ..wire.lora import lora_from_proto, lora_to_proto
from ..wire.protocol import SessionConfig

log = logging.getLogger(__name__)

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class RemoteError(RuntimeError):
    """The server refused a request; ``code`` is the gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class ServerUnreachable(ConnectionError):
    pass


class Traffic:
    """Bytes and messages each way, for the progress bar and benchmarks."""

    def __init__(self) -> None:
        self.sent = self.received = self.messages = 0

    def reset(self) -> None:
        self.sent = self.received = self.messages = 0


class RemoteTransport:
    """Opens sessions on a server. Connection failures are retried with backoff, then reported."""

    def __init__(
        self,
        address: str,
        token: str | None = None,
        tls_ca: str | None = None,
        wire_dtype: str = codec.DEFAULT_WIRE_DTYPE,
        fingerprint: str = "",
        retries: int = 4,
        backoff: float = 0.5,
        timeout: float | None = None,
        max_message_bytes: int = codec.DEFAULT_MAX_MESSAGE_BYTES,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        """``tls_ca`` verifies the server (TLS); ``tls_cert`` + ``tls_key`` (PEM) are this client's
        certificate for a server that asks for one (mutual TLS, ``serve --tls-client-ca``)."""
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("mutual TLS needs both a client certificate and its key (--tls-cert, --tls-key)")
        self.address, self.token, self.wire_dtype, self.fingerprint = address, token, wire_dtype, fingerprint
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self.traffic = Traffic()
        # Reconnect quickly after a server restart instead of gRPC's default backoff of up to two minutes.
        # A session stream has no deadline (``timeout`` = None; training runs last days); keepalive pings
        # notice a server that vanished without closing the connection.
        options = codec.channel_options(max_message_bytes) + [
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 5_000),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
        ]
        if tls_ca or tls_cert:

            def read(path: str | None) -> bytes | None:
                if path is None:
                    return None
                with open(path, "rb") as f:
                    return f.read()

            creds = grpc.ssl_channel_credentials(
                root_certificates=read(tls_ca), private_key=read(tls_key), certificate_chain=read(tls_cert)
            )
            self.channel = grpc.secure_channel(address, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.SplitServiceStub(self.channel)

    @property
    def metadata(self):
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def _retry(self, fn):
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except grpc.RpcError as exc:
                error = RemoteError(exc.code(), exc.details())
            except RemoteError as exc:
                error = exc
            if error.code not in _RETRYABLE:
                raise error
            if attempt == self.retries:
                raise ServerUnreachable(
                    f"cannot reach the fedsplit server at {self.address} after {self.retries + 1} attempts "
                    f"({error.message}); is `fedsplit serve` running there?"
                ) from None
            delay = self.backoff * 2**attempt
            log.warning("server %s unavailable, retrying in %.1fs", self.address, delay)
            time.sleep(delay)

    def info(self) -> pb.InfoReply:
        return self._retry(lambda: self.stub.Info(pb.InfoRequest(), metadata=self.metadata, timeout=30))

    def open(self, config: SessionConfig, resume: str | None = None) -> RemoteSession:
        """Open a session (or re-attach to a parked one of ours with ``resume``)."""
        return self._retry(lambda: RemoteSession(self, config, resume))

    def close(self) -> None:
        self.channel.close()


class RemoteSession:
    """One session on the server; methods mirror :class:`fedsplit.server.session.BodySession`."""

    def __init__(self, transport: RemoteTransport, config: SessionConfig, resume: str | None = None) -> None:
        self.transport, self.config = transport, config
        self._outbox: queue.Queue = queue.Queue()
        self._seq = 0
        self._call = transport.stub.Session(
            iter(self._outbox.get, None), metadata=transport.metadata, timeout=transport.timeout
        )
        request = pb.OpenSession(
            model_fingerprint=transport.fingerprint,
            span_start=config.span[0],
            span_end=config.span[1],
            mode=pb.TRAIN if config.mode == "train" else pb.GENERATE,
            max_length=config.max_length,
            max_batch_size=config.max_batch,
            wire_dtype=codec.wire_dtype_enum(transport.wire_dtype),
            learning_rate=config.lr,
            weight_decay=config.weight_decay,
        )
        if config.warmup_steps:
            request.warmup_steps = config.warmup_steps
        if resume:
            request.resume_session_id = resume
        if config.run_id:
            request.run_id = config.run_id
            request.resume_steps.extend(int(s) for s in config.resume_steps)
        if config.lora is not None:
            request.lora.CopyFrom(lora_to_proto(config.lora))
            if config.seed is not None:
                request.lora.seed = config.seed
        try:
            reply = self._request(pb.ClientMessage(open=request))
        except BaseException:
            self._outbox.put(None)
            raise
        self.id = reply.opened.session_id
        self.resumed = reply.opened.resumed
        self.opened_step = int(reply.opened.step)  # a run_id session continues from this optimiser step
        self.last_stats: dict[str, float] = {}
        self.closed = False

    def _request(self, msg: pb.ClientMessage) -> pb.ServerMessage:
        self._seq += 1
        msg.seq = self._seq
        self.transport.traffic.sent += msg.ByteSize()
        self.transport.traffic.messages += 1
        self._outbox.put(msg)
        try:
            reply = next(self._call)
        except StopIteration:
            raise RemoteError(grpc.StatusCode.UNAVAILABLE, "the server closed the session") from None
        except grpc.RpcError as exc:
            self.closed = True
            raise RemoteError(exc.code(), exc.details()) from None
        self.transport.traffic.received += reply.ByteSize()
        if reply.WhichOneof("kind") == "error":
            code = next(
                (c for c in grpc.StatusCode if c.value[0] == reply.error.code), grpc.StatusCode.UNKNOWN
            )
            raise RemoteError(code, reply.error.message)
        return reply

    def forward(
        self,
        step_id: int,
        hidden: torch.Tensor,
        pad_lengths: torch.Tensor,
        offset: int = 0,
        keep_graph: bool = True,
        use_cache: bool = True,
    ) -> torch.Tensor:
        reply = self._request(
            pb.ClientMessage(
                forward=pb.Forward(
                    step_id=step_id,
                    hidden=codec.encode_tensor(hidden, self.transport.wire_dtype),
                    pad_lengths=[int(x) for x in pad_lengths],
                    position_offset=offset,
                    use_cache=self.config.mode == "generate" and use_cache,
                    keep_graph=self.config.mode == "train" and keep_graph,
                )
            )
        )
        # The body's output goes where the client computes: the device and dtype of what it sent.
        received = codec.decode_tensor(reply.forward_result.hidden, out_dtype=hidden.dtype)
        return received.to(hidden.device)

    def backward(self, step_id: int, grad: torch.Tensor) -> torch.Tensor:
        reply = self._request(
            pb.ClientMessage(
                backward=pb.Backward(
                    step_id=step_id, grad=codec.encode_tensor(grad, self.transport.wire_dtype)
                )
            )
        )
        return codec.decode_tensor(reply.backward_result.grad, out_dtype=grad.dtype).to(grad.device)

    def step(self, clip_norm: float = 0.0, checkpoint: bool = False) -> None:
        """Apply the body update; ``checkpoint`` asks the server to save the run too (see ``last_stats``)."""
        step = pb.OptimizerStep(step_id=self._seq, checkpoint=checkpoint)
        if clip_norm > 0:
            step.grad_clip_norm = clip_norm
        reply = self._request(pb.ClientMessage(step=step))
        self.last_stats = dict(reply.step_done.stats)

    def adapter_state(self):
        """The session's body LoRA: (LoraSettings, {name: tensor})."""
        reply = self._request(pb.ClientMessage(fetch_adapter=pb.FetchAdapter()))
        return lora_from_proto(reply.adapter.lora), codec.from_named_tensors(reply.adapter.tensors)

    def put_adapter(self, settings, state) -> None:
        self._request(
            pb.ClientMessage(
                put_adapter=pb.PutAdapter(
                    lora=lora_to_proto(settings), tensors=codec.named_tensors(state, "fp32")
                )
            )
        )

    def close(self) -> None:
        if not getattr(self, "closed", True):
            self.closed = True
            self._outbox.put(pb.ClientMessage(close=pb.Close()))
            self._outbox.put(None)
            try:
                for _ in self._call:
                    pass
            except grpc.RpcError:
                pass

    def __del__(self):  # a forgotten session still ends its stream
        try:
            self.close()
        except Exception:
            pass
