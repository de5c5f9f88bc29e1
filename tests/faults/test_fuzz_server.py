"""Hostile input against a live server: every case gets a clear status, the server stays up and bounded.

One tiny-llama server (three clients' tokens, a short session TTL) serves the whole module.
A second client, bob, keeps a training session open throughout; after every generated
case his session must still return exactly the output it returned before the fuzzing —
other sessions keep working. At the end every parked session has been evicted and the
server's reserved memory, adapters and RSS are back near where they started.
"""

from __future__ import annotations

import os
import time

import grpc
import psutil
import pytest
import torch
from faultkit import CLEAR, RawClient, check_outcome, count_case, tensor, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsplit.client.remote import RemoteTransport
from fedsplit.model.lora import LoraSettings
from fedsplit.server.auth import add_token
from fedsplit.server.config import ServerConfig
from fedsplit.server.runner import build_servicer, start_background
from fedsplit.wire import fedsplit_pb2 as pb
from fedsplit.wire.protocol import SessionConfig

HIDDEN = 64  # tiny-llama
TTL = 1.0
# Bounded so that the module (328 generated cases) fits `make test-fast`: about 16 s on two cores.
FUZZ = settings(
    max_examples=75,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)


class Harness:
    """The server, tokens, a raw client and bob's canary session."""

    def __init__(self, tmp):
        tokens_file = tmp / "tokens"
        self.tokens = {name: add_token(tokens_file, name) for name in ("alice", "bob", "mallory")}
        config = ServerConfig(
            model="tiny-llama",
            port=0,
            session_ttl=TTL,
            memory_budget=256 << 20,
            max_graphs=4,
            checkpoint_dir=str(tmp / "runs"),
            checkpoint_every=2,
        )
        self.server = start_background(build_servicer(config, tokens_file=str(tokens_file)))
        self.servicer = self.server.servicer
        self.raw = RawClient(self.server.address)
        self.fingerprint = self.servicer.fingerprint
        bob = RemoteTransport(
            self.server.address,
            token=self.tokens["bob"],
            wire_dtype="fp32",
            fingerprint=self.fingerprint,
            retries=0,
        )
        self.bob = bob.open(
            SessionConfig(
                span=(1, 3), mode="train", lora=LoraSettings(rank=2), seed=1, max_length=8, max_batch=1
            )
        )
        self.probe = torch.randn(1, 4, HIDDEN, generator=torch.Generator().manual_seed(0))
        self.expected = self._bob_output()
        self.process = psutil.Process(os.getpid())

    def _bob_output(self) -> torch.Tensor:
        out = self.bob.forward(1, self.probe, torch.zeros(1, dtype=torch.long))
        self.bob.backward(1, torch.zeros_like(out))  # consume the graph; no step, so the adapter stays
        return out

    def check_alive(self) -> None:
        assert self.server.thread.is_alive(), "the server thread died"
        assert torch.equal(self._bob_output(), self.expected), "another client's session was disturbed"

    def run(
        self, name: str, messages: list[bytes], token: str | None, parseable: bool = True
    ) -> grpc.StatusCode:
        count_case(name)
        code, details, replies = self.raw.stream(messages, token)
        check_outcome(code, details, replies, parseable)
        self.check_alive()
        return code


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    harness = Harness(tmp_path_factory.mktemp("fuzz"))
    yield harness
    harness.bob.close()
    harness.raw.close()
    harness.server.stop()


# --------------------------------------------------------------------------- strategies

step_ids = st.integers(0, 4)  # few ids: replays, duplicates and out-of-order steps are common
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
dims = st.one_of(
    st.sampled_from([0, 1, 2, 3, 4, HIDDEN, HIDDEN + 1]), st.sampled_from([1 << 31, 1 << 62, 2**64 - 1])
)


@st.composite
def tensors(draw, hidden_like: bool = True):
    """Mostly well-formed hidden states, sometimes with wrong dtype, shape, length, NaN/Inf or huge sizes."""
    kind = draw(st.sampled_from(["good"] * 5 + ["nonfinite", "shape", "dtype", "length", "huge"]))
    rows, tokens = draw(st.integers(1, 2)), draw(st.integers(1, 4))
    t = torch.randn(rows, tokens, HIDDEN, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    if kind == "nonfinite":
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(
            st.sampled_from([float("nan"), float("inf"), -float("inf")])
        )
    msg = tensor(t, draw(st.sampled_from(["fp32", "fp16", "bf16", "int8"])))
    if kind == "shape":
        msg.ClearField("shape")
        msg.shape.extend(draw(st.lists(dims, max_size=5)))
    elif kind == "dtype":
        msg.dtype = draw(st.integers(-3, 9))
    elif kind == "length":
        msg.data = draw(st.binary(max_size=64))
    elif kind == "huge":
        msg.ClearField("shape")
        msg.shape.extend([1 << 20, 1 << 20, HIDDEN])
        msg.data = b""
    return msg


lora_configs = st.builds(
    pb.LoraConfig,
    rank=st.sampled_from([0, 1, 2, 4, 5000]),
    alpha=floats,
    dropout=st.sampled_from([0.0, 0.5, 1.0, -1.0, float("nan"), 2.0]),
    target_modules=st.lists(
        st.sampled_from(["q_proj", "v_proj", "nope", "", "lm_head", "embed_tokens"]), max_size=2
    ),
)


@st.composite
def opens(draw, h):
    """A valid OpenSession (TRAIN or GENERATE) with zero to three fields replaced by hostile values."""
    mode = draw(st.sampled_from([pb.TRAIN, pb.GENERATE]))
    req = pb.OpenSession(
        model_fingerprint=h.fingerprint,
        span_start=1,
        span_end=3,
        mode=mode,
        max_length=16,
        wire_dtype=draw(st.sampled_from([pb.FP32, pb.FP16, pb.BF16, pb.INT8])),
        max_batch_size=draw(st.sampled_from([0, 1, 2])),
    )
    if mode == pb.TRAIN and draw(st.booleans()):
        req.lora.CopyFrom(pb.LoraConfig(rank=2, alpha=4.0))
        req.run_id = draw(st.sampled_from(["r1", "r2"]))
    hostile = {
        "model_fingerprint": st.sampled_from(["", "0123456789abcdef", "x" * 1000]),
        "span_start": st.sampled_from([0, 2, 3, 5, 2**32 - 1]),
        "span_end": st.sampled_from([0, 1, 4, 9, 2**32 - 1]),
        "mode": st.sampled_from([0, 7, -1]),
        "max_length": st.sampled_from([0, 1, 1 << 20, 2**32 - 1]),
        "wire_dtype": st.sampled_from([5, 99, -4]),
        "max_batch_size": st.sampled_from([1 << 30, 2**32 - 1]),
        "lora": lora_configs,
        "learning_rate": st.floats(allow_nan=True, allow_infinity=True),
        "weight_decay": st.floats(allow_nan=True, allow_infinity=True),
        "resume_session_id": st.sampled_from(["", "s1-bob", h.bob.id, "x" * 300, "s999-alice"]),
        "run_id": st.sampled_from(["../../etc", "", "\u00e9", "a" * 80, ".hidden", "r1"]),
        "resume_steps": st.lists(st.sampled_from([0, 1, 2, 4, 2**63]), max_size=3),
    }
    for name in draw(st.lists(st.sampled_from(sorted(hostile)), max_size=3, unique=True)):
        value = draw(hostile[name])
        if name == "lora":
            req.lora.CopyFrom(value)
        elif name == "resume_steps":
            req.resume_steps.extend(value)
        else:
            setattr(req, name, value)
    return req


@st.composite
def requests(draw):
    kind = draw(
        st.sampled_from(
            ["forward"] * 6 + ["backward"] * 3 + ["step"] * 2 + ["fetch", "put", "empty", "open", "close"]
        )
    )
    if kind == "forward":
        t = draw(tensors())
        rows = t.shape[0] if len(t.shape) > 0 and t.shape[0] <= 4 else 1
        pad = draw(st.sampled_from([[0] * rows] * 3 + [[], [1] * rows, [0, 0, 0], [2**32 - 1] * rows]))
        return pb.ClientMessage(
            forward=pb.Forward(
                step_id=draw(step_ids),
                hidden=t,
                pad_lengths=pad,
                position_offset=draw(st.sampled_from([0, 0, 0, 1, 2, 3, 4, 2**32 - 1])),
                use_cache=draw(st.booleans()),
                keep_graph=draw(st.booleans()),
            )
        )
    if kind == "backward":
        return pb.ClientMessage(backward=pb.Backward(step_id=draw(step_ids), grad=draw(tensors())))
    if kind == "step":
        step = pb.OptimizerStep(step_id=draw(step_ids), checkpoint=draw(st.booleans()))
        if draw(st.booleans()):
            step.grad_clip_norm = draw(floats)
        return pb.ClientMessage(step=step)
    if kind == "fetch":
        return pb.ClientMessage(fetch_adapter=pb.FetchAdapter())
    if kind == "put":
        names = st.sampled_from(
            [
                "layers.1.self_attn.q_proj.lora_A.weight",
                "layers.1.self_attn.q_proj.lora_B.weight",
                "layers.9.mlp.lora_A.weight",
                "",
                "x",
            ]
        )
        tensors_ = draw(st.lists(st.builds(pb.NamedTensor, name=names, tensor=tensors()), max_size=3))
        return pb.ClientMessage(put_adapter=pb.PutAdapter(lora=draw(lora_configs), tensors=tensors_))
    if kind == "open":
        return pb.ClientMessage(open=pb.OpenSession(mode=pb.GENERATE, span_start=1, span_end=3, max_length=8))
    if kind == "close":
        return pb.ClientMessage(close=pb.Close())
    return pb.ClientMessage()


def _train_open(h, **extra) -> pb.OpenSession:
    """A valid TRAIN open of the body layers 1-3 with a small LoRA, fp32 on the wire."""
    return pb.OpenSession(
        model_fingerprint=h.fingerprint,
        span_start=1,
        span_end=3,
        mode=pb.TRAIN,
        max_length=8,
        wire_dtype=pb.FP32,
        lora=pb.LoraConfig(rank=2, alpha=4.0),
        **extra,
    )


def _serialize(msgs) -> list[bytes]:
    return [m.SerializeToString() for m in msgs]


# --------------------------------------------------------------------------- tests


@FUZZ
@given(data=st.data())
def test_random_sessions_get_clear_statuses(h, data):
    """A fuzzed OpenSession followed by up to six fuzzed requests (valid, malformed, replayed, out of order)."""
    msgs = [pb.ClientMessage(seq=0, open=data.draw(opens(h)))]
    msgs += data.draw(st.lists(requests(), min_size=1, max_size=6))
    for seq, m in enumerate(msgs):
        m.seq = seq
    h.run("sessions", _serialize(msgs), h.tokens["alice"])


@settings(FUZZ, max_examples=50)  # the slowest kind: up to 12 requests with real forward/backward each
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("forward"), step_ids),
            st.tuples(st.just("backward"), step_ids),
            st.tuples(st.just("step"), step_ids),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_out_of_order_and_replayed_steps_follow_the_protocol(h, ops):
    """Valid tensors, any order of forward/backward/step ids: each reply is what the protocol says."""
    count_case("order")
    hidden = tensor(torch.randn(1, 3, HIDDEN, generator=torch.Generator().manual_seed(5)))
    grad = tensor(torch.ones(1, 3, HIDDEN))
    open_ = _train_open(h)
    msgs, expected, pending = [pb.ClientMessage(seq=0, open=open_)], ["opened"], set()
    for seq, (kind, step_id) in enumerate(ops, 1):
        if kind == "forward":
            msgs.append(
                pb.ClientMessage(
                    seq=seq,
                    forward=pb.Forward(step_id=step_id, hidden=hidden, pad_lengths=[0], keep_graph=True),
                )
            )
            if step_id in pending:
                expected.append(grpc.StatusCode.ALREADY_EXISTS)
            elif len(pending) >= 4:  # the server's max_graphs
                expected.append(grpc.StatusCode.RESOURCE_EXHAUSTED)
            else:
                pending.add(step_id)
                expected.append("forward_result")
        elif kind == "backward":
            msgs.append(pb.ClientMessage(seq=seq, backward=pb.Backward(step_id=step_id, grad=grad)))
            expected.append("backward_result" if step_id in pending else grpc.StatusCode.NOT_FOUND)
            pending.discard(step_id)
        else:
            msgs.append(pb.ClientMessage(seq=seq, step=pb.OptimizerStep(step_id=step_id)))
            expected.append("step_done")
            pending.clear()  # a step drops forwards still waiting: the weights they used changed
    msgs.append(pb.ClientMessage(close=pb.Close()))
    code, details, replies = h.raw.stream(_serialize(msgs), h.tokens["alice"])
    assert code == grpc.StatusCode.OK, details
    got = [_reply_kind(r) for r in replies]
    assert got == expected
    assert [r.seq for r in replies] == list(range(len(ops) + 1))  # one reply per request, in order
    h.check_alive()


def _reply_kind(reply):
    kind = reply.WhichOneof("kind")
    if kind != "error":
        return kind
    return next(c for c in grpc.StatusCode if c.value[0] == reply.error.code)


def _valid_train_stream(h) -> list[bytes]:
    hidden = torch.randn(1, 3, HIDDEN, generator=torch.Generator().manual_seed(3))
    open_ = _train_open(h, run_id="mut")
    msgs = [
        pb.ClientMessage(seq=1, open=open_),
        pb.ClientMessage(
            seq=2, forward=pb.Forward(step_id=1, hidden=tensor(hidden), pad_lengths=[0], keep_graph=True)
        ),
        pb.ClientMessage(seq=3, backward=pb.Backward(step_id=1, grad=tensor(torch.ones_like(hidden)))),
        pb.ClientMessage(seq=4, step=pb.OptimizerStep(step_id=1, checkpoint=True)),
        pb.ClientMessage(seq=5, close=pb.Close()),
    ]
    return _serialize(msgs)


@FUZZ
@given(
    index=st.integers(0, 4),
    how=st.sampled_from(["flip", "truncate", "insert", "duplicate", "drop"]),
    where=st.integers(0, 10_000),
    byte=st.integers(0, 255),
    count=st.integers(1, 8),
)
def test_mutated_protobuf_messages_get_clear_statuses(h, index, how, where, byte, count):
    """A valid training stream with one message's bytes flipped, cut, padded, duplicated or dropped."""
    msgs = _valid_train_stream(h)
    data = bytearray(msgs[index])
    pos = where % max(len(data), 1)
    if how == "flip":
        for i in range(count):
            data[(pos + i * 7) % len(data)] ^= byte or 0xFF
    elif how == "truncate":
        data = data[:pos]
    elif how == "insert":
        data[pos:pos] = bytes([byte]) * count
    mutated = bytes(data)
    if how == "duplicate":
        msgs.insert(index, msgs[index])
    elif how == "drop":
        del msgs[index]
    else:
        msgs[index] = mutated
    try:
        pb.ClientMessage.FromString(mutated)
        parseable = True
    except Exception:
        parseable = False
    h.run("mutated", msgs, h.tokens["alice"], parseable=parseable)


@FUZZ
@given(
    messages=st.lists(st.binary(max_size=200), min_size=1, max_size=4),
    token=st.sampled_from(["alice", None, "", "garbage"]),
)
def test_random_bytes_get_clear_statuses(h, messages, token):
    count_case("bytes")
    code, details, replies = h.raw.stream(messages, h.tokens.get(token, token))
    assert code in CLEAR, f"{code.name}: {details}"
    if token != "alice":
        assert code == grpc.StatusCode.UNAUTHENTICATED
    h.check_alive()


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    token=st.sampled_from([None, "", "Bearer", "x" * 5000, "alice-but-wrong", "~!@#$%^&*()"]),
    method=st.sampled_from(["session", "info"]),
)
def test_missing_or_invalid_tokens_are_unauthenticated(h, token, method):
    count_case("tokens")
    if method == "session":
        open_ = pb.ClientMessage(
            open=pb.OpenSession(mode=pb.GENERATE, span_start=1, span_end=3, max_length=8)
        )
        code, _, _ = h.raw.stream([open_.SerializeToString()], token)
    else:
        try:
            metadata = [("authorization", f"Bearer {token}")] if token is not None else []
            h.raw.info(b"", metadata=metadata, timeout=10)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
    assert code == grpc.StatusCode.UNAUTHENTICATED
    h.check_alive()


def test_other_clients_session_and_run_are_out_of_reach(h):
    count_case("ownership")
    open_ = pb.ClientMessage(open=pb.OpenSession(resume_session_id=h.bob.id, mode=pb.TRAIN))
    code, details, _ = h.raw.stream([open_.SerializeToString()], h.tokens["mallory"])
    assert code == grpc.StatusCode.PERMISSION_DENIED, details
    # bob's session is attached to his stream: even bob cannot take it twice
    code, _, _ = h.raw.stream([open_.SerializeToString()], h.tokens["bob"])
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    h.check_alive()


def test_server_memory_and_sessions_stay_bounded(h):
    """Runs last in this module: after the TTL only bob's session is left and memory is back."""
    start_rss = h.process.memory_info().rss
    for _ in range(20):  # a burst of abandoned sessions with caches and pending graphs
        h.run("burst", _valid_train_stream(h)[:3], h.tokens["alice"])
        gen = pb.OpenSession(
            model_fingerprint=h.fingerprint,
            span_start=1,
            span_end=3,
            mode=pb.GENERATE,
            max_length=16,
            wire_dtype=pb.FP32,
        )
        fwd = pb.Forward(hidden=tensor(torch.randn(1, 8, HIDDEN)), pad_lengths=[0], use_cache=True)
        h.run(
            "burst",
            _serialize([pb.ClientMessage(open=gen), pb.ClientMessage(forward=fwd)]),
            h.tokens["alice"],
        )
    servicer = h.servicer
    assert wait_until(lambda: set(servicer.sessions) == {h.bob.id}, timeout=TTL * 10), list(servicer.sessions)
    time.sleep(0.5)  # the worker frees evicted sessions' adapters after the eviction
    assert servicer.memory_in_use() == servicer._reserved[h.bob.id]
    assert len(servicer.pool.settings) <= 2, list(servicer.pool.settings)  # bob's adapter (+ one being freed)
    assert h.process.memory_info().rss - start_rss < 200 << 20
    info = h.raw.info(b"", metadata=[("authorization", f"Bearer {h.tokens['bob']}")], timeout=10)
    assert info.held_end == 4
    h.check_alive()
