"""Helpers for the fault tests: raw gRPC streams (any bytes), canaries, case counting."""

from __future__ import annotations

import collections
import threading
import time

import grpc
import torch

from fedsplit.wire import codec
from fedsplit.wire import fedsplit_pb2 as pb

SESSION_METHOD = "/fedsplit.v1.SplitService/Session"
INFO_METHOD = "/fedsplit.v1.SplitService/Info"
#: Every status a bad request may end with. UNKNOWN (an unhandled exception in the server) and
#: DEADLINE_EXCEEDED (a hang) are failures.
CLEAR = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.ALREADY_EXISTS,
}
CLEAR_NUMBERS = {c.value[0] for c in CLEAR if c != grpc.StatusCode.OK}
CALL_TIMEOUT = 20.0

# hypothesis cases run per test, reported in the terminal summary
CASES: collections.Counter = collections.Counter()
_lock = threading.Lock()


def count_case(name: str) -> None:
    with _lock:
        CASES[name] += 1


class RawClient:
    """Sends arbitrary request bytes on the Session stream and reports what came back."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address, options=codec.channel_options())
        self.session = self.channel.stream_stream(
            SESSION_METHOD, request_serializer=None, response_deserializer=pb.ServerMessage.FromString
        )
        self.info = self.channel.unary_unary(
            INFO_METHOD, request_serializer=None, response_deserializer=pb.InfoReply.FromString
        )

    def stream(self, messages: list[bytes], token: str | None) -> tuple[grpc.StatusCode, str, list]:
        """(final status, its details, replies) of one stream carrying ``messages``."""
        metadata = [("authorization", f"Bearer {token}")] if token is not None else []
        replies = []
        try:
            for reply in self.session(iter(messages), metadata=metadata, timeout=CALL_TIMEOUT):
                replies.append(reply)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or "", replies
        return grpc.StatusCode.OK, "", replies

    def close(self) -> None:
        self.channel.close()


def check_outcome(code: grpc.StatusCode, details: str, replies: list, parseable: bool = True) -> None:
    """The server answered with a clear status and clear per-request errors."""
    assert code in CLEAR, f"unclear status {code.name}: {details}"
    if not parseable:
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OK) or replies, (code, details)
    if code != grpc.StatusCode.OK:
        assert details, f"{code.name} without a message"
    for reply in replies:
        if reply.WhichOneof("kind") == "error":
            assert reply.error.code in CLEAR_NUMBERS, reply.error
            assert reply.error.message


def tensor(t: torch.Tensor, dtype: str = "fp32") -> pb.Tensor:
    return codec.encode_tensor(t, dtype)


def wait_until(predicate, timeout: float, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()
