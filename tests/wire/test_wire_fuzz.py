"""Untrusted bytes never crash the decoder with anything but DecodeError or WireError."""

import struct

import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsplit.wire import codec
from fedsplit.wire import fedsplit_pb2 as pb

# Small enough that a matching data length stays cheap, large enough to exercise the limit.
MAX_ELEMENTS = 4096
# No example database: the suite leaves no .hypothesis folder behind; failures print their example.
FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _check_tensor(msg: pb.Tensor) -> None:
    """decode_tensor either raises WireError or returns a finite tensor of the declared shape."""
    try:
        t = codec.decode_tensor(msg, max_elements=MAX_ELEMENTS)
    except codec.WireError as err:
        assert err.code is not None and str(err)
        return
    assert tuple(t.shape) == tuple(msg.shape)
    if t.is_floating_point():
        assert torch.isfinite(t).all()


def _check_client_bytes(data: bytes) -> None:
    try:
        msg = pb.ClientMessage.FromString(data)
    except DecodeError:
        return
    kind = msg.WhichOneof("kind")
    if kind == "forward":
        _check_tensor(msg.forward.hidden)
    elif kind == "backward":
        _check_tensor(msg.backward.grad)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_parse_fail_or_decode_safely(data):
    _check_client_bytes(data)


def _valid_forward(seed: int, wire_dtype: str) -> bytes:
    hidden = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(seed))
    msg = pb.ClientMessage(
        seq=seed,
        forward=pb.Forward(step_id=seed, hidden=codec.encode_tensor(hidden, wire_dtype), pad_lengths=[0, 1]),
    )
    return msg.SerializeToString()


@FUZZ
@given(
    st.integers(0, 1000),
    st.sampled_from(codec.WIRE_DTYPES),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_mutated_valid_forward_parses_fail_or_decode_safely(seed, wire_dtype, flips):
    data = bytearray(_valid_forward(seed, wire_dtype))
    for pos, value in flips:
        data[pos % len(data)] = value
    _check_client_bytes(bytes(data))


# Zero and huge sizes together are the dangerous mix: the element count is 0 but the shape overflows.
dims = st.one_of(
    st.sampled_from([0, 1, 2, 3, 8, 576, 1 << 31, 1 << 40, 1 << 63, 2**64 - 1]),
    st.integers(0, 2**64 - 1),
)


@st.composite
def tensors(draw):
    """Structurally valid Tensor messages with adversarial dtype, shape, data and scales."""
    dtype = draw(st.one_of(st.sampled_from([1, 2, 3, 4, 5]), st.integers(-(2**31), 2**31 - 1)))
    shape = draw(st.one_of(st.lists(dims, max_size=4), st.lists(dims, max_size=10)))
    if draw(st.booleans()):
        # Matching data length, random contents (may hold NaN/Inf bit patterns).
        numel = 1
        for d in shape:
            numel *= d
        item = {1: 4, 2: 2, 3: 2, 4: 1, 5: 8}.get(dtype, 4)
        size = numel * item if numel * item <= 4096 else draw(st.integers(0, 64))
        data = draw(st.binary(min_size=size, max_size=size))
    else:
        data = draw(st.binary(max_size=256))
    if dtype == 4 and draw(st.booleans()):
        rows = 1
        for d in shape[:-1]:
            rows *= d
        rows = rows if rows <= 1024 else draw(st.integers(0, 8))
        scales = b"".join(struct.pack("<f", draw(st.floats(width=32))) for _ in range(rows))
    else:
        scales = draw(st.binary(max_size=32))
    return pb.Tensor(dtype=dtype, shape=shape, data=data, scales=scales)


@FUZZ
@given(tensors())
def test_adversarial_tensor_messages_decode_safely(msg):
    _check_tensor(msg)
    # The same message after a trip through bytes behaves the same way.
    _check_tensor(pb.Tensor.FromString(msg.SerializeToString()))
