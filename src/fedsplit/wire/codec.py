"""Tensors to and from `fedsplit.v1.Tensor` messages.

A tensor travels as dtype + shape + raw little-endian bytes (never pickle).
Floating tensors are cast to the session's wire dtype on the way out:

* ``fp32``, ``fp16``, ``bf16`` — plain casts;
* ``int8`` — per-row absmax quantisation: a row is a vector along the last
  dimension, its scale ``absmax / 127`` goes as fp32 in ``Tensor.scales``.

Integer and bool tensors (token or index tensors) always travel as exact
``INT64``. Decoding validates everything a peer controls — dtype, declared
size (before allocating anything), byte length, shape, finiteness — and
raises :class:`WireError`, which carries the gRPC status code to answer with.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import grpc
import numpy as np
import torch
from google.protobuf.message import Message

from fedsplit.wire import fedsplit_pb2 as pb

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_WIRE_DTYPE",
    "MAX_NDIM",
    "PROTOCOL_VERSION",
    "WIRE_DTYPES",
    "WireError",
    "channel_options",
    "check_message_size",
    "decode_tensor",
    "encode_tensor",
    "from_named_tensors",
    "named_tensors",
    "tensor_nbytes",
    "wire_dtype_enum",
    "wire_dtype_name",
]

#: Dtypes hidden states and gradients can travel in (OpenSession.wire_dtype).
WIRE_DTYPES = ("fp32", "fp16", "bf16", "int8")
DEFAULT_WIRE_DTYPE = "fp16"
#: Default gRPC send/receive limit on both sides.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
#: Version of proto/fedsplit.proto spoken by this code (InfoReply.protocol_version).
PROTOCOL_VERSION = 1
#: Most dimensions a received tensor may declare.
MAX_NDIM = 8

_NAME_TO_ENUM = {"fp32": pb.FP32, "fp16": pb.FP16, "bf16": pb.BF16, "int8": pb.INT8, "int64": pb.INT64}
_ENUM_TO_NAME = {v: k for k, v in _NAME_TO_ENUM.items()}
_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
# Bytes per element in Tensor.data; INT8 adds 4 bytes of scale per row.
_ITEMSIZE = {pb.FP32: 4, pb.FP16: 2, pb.BF16: 2, pb.INT8: 1, pb.INT64: 8}
# Little-endian numpy views of Tensor.data (bf16 is read as its raw 16 bits).
_LE = {
    pb.FP32: np.dtype("<f4"),
    pb.FP16: np.dtype("<f2"),
    pb.BF16: np.dtype("<i2"),
    pb.INT64: np.dtype("<i8"),
}
_SCALE_LE = np.dtype("<f4")
# Wire dtypes a GPU tensor is cast to before it is copied to the host (fewer bytes to copy).
_NARROW = {"fp16": torch.float16, "bf16": torch.bfloat16}


class WireError(ValueError):
    """A tensor or message that cannot be encoded or accepted.

    ``code`` is the gRPC status to answer with: ``INVALID_ARGUMENT`` for
    malformed input, ``RESOURCE_EXHAUSTED`` for input over a size limit.
    """

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT):
        super().__init__(message)
        self.code = code
        self.message = message

    def to_proto(self) -> pb.Error:
        """This error as a session-stream ``Error`` reply (numeric status code + message)."""
        return pb.Error(code=self.code.value[0], message=self.message)


def wire_dtype_enum(name: str) -> int:
    """The ``DType`` enum value for a dtype name such as ``"fp16"`` (case-insensitive)."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _NAME_TO_ENUM:
        raise WireError(f"unknown wire dtype {name!r}; choose one of {', '.join(WIRE_DTYPES)}")
    return _NAME_TO_ENUM[key]


def wire_dtype_name(enum_value: int) -> str:
    """The dtype name (``"fp32"``, ``"fp16"``, ``"bf16"``, ``"int8"``, ``"int64"``) of a ``DType`` value."""
    if enum_value not in _ENUM_TO_NAME:
        raise WireError(f"unknown tensor dtype enum {enum_value}; expected one of {_known_enums()}")
    return _ENUM_TO_NAME[enum_value]


def _known_enums() -> str:
    return ", ".join(f"{v} ({pb.DType.Name(v)})" for v in _ENUM_TO_NAME)


# --------------------------------------------------------------------------- encoding


def encode_tensor(t: torch.Tensor, wire_dtype: str = DEFAULT_WIRE_DTYPE) -> pb.Tensor:
    """Encode ``t`` as a ``Tensor`` message.

    Floating tensors are cast to ``wire_dtype`` (one of :data:`WIRE_DTYPES`);
    integer and bool tensors are sent exactly as ``INT64`` whatever
    ``wire_dtype`` says. The tensor is detached and moved to the CPU first (from a GPU, a
    floating tensor is narrowed to an fp16/bf16 wire dtype before it crosses the bus).
    """
    t = t.detach()
    if t.device.type != "cpu":
        key = str(wire_dtype).strip().lower()
        narrow = _NARROW.get(_ALIASES.get(key, key))
        if t.is_floating_point() and narrow is not None and narrow.itemsize < t.element_size():
            t = t.to(narrow)
        t = t.cpu()
    shape = list(t.shape)
    if t.is_complex():
        raise WireError(f"cannot send a complex tensor ({t.dtype}); only real floating and integer tensors")
    if not t.is_floating_point():
        data = t.to(torch.int64).contiguous().numpy().astype(_LE[pb.INT64], copy=False).tobytes()
        return pb.Tensor(dtype=pb.INT64, shape=shape, data=data)

    enum = wire_dtype_enum(wire_dtype)
    if enum == pb.FP32:
        data = t.to(torch.float32).contiguous().numpy().astype(_LE[pb.FP32], copy=False).tobytes()
    elif enum == pb.FP16:
        data = t.to(torch.float16).contiguous().numpy().astype(_LE[pb.FP16], copy=False).tobytes()
    elif enum == pb.BF16:
        bits = t.to(torch.bfloat16).contiguous().view(torch.int16)
        data = bits.numpy().astype(_LE[pb.BF16], copy=False).tobytes()
    elif enum == pb.INT8:
        q, scales = _quantize_int8(t)
        return pb.Tensor(dtype=pb.INT8, shape=shape, data=q.tobytes(), scales=scales.tobytes())
    else:
        raise WireError(
            f"cannot send a floating tensor as {wire_dtype!r}; choose one of {', '.join(WIRE_DTYPES)}"
        )
    return pb.Tensor(dtype=enum, shape=shape, data=data)


def _int8_rows(shape: tuple[int, ...]) -> tuple[int, int]:
    """(number of rows, row length) of the int8 row layout; a scalar is one row of one."""
    if not shape:
        return 1, 1
    return math.prod(shape[:-1]), shape[-1]


def _quantize_int8(t: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-row absmax int8: returns (int8 values, little-endian fp32 scales).

    Done in numpy, which is about twice as fast as torch here on CPU.
    """
    nrows, last = _int8_rows(tuple(t.shape))
    rows = t.to(torch.float32).contiguous().numpy().reshape(nrows, last)
    if last > 0:
        scale = np.abs(rows).max(axis=1) / np.float32(127.0)
    else:
        scale = np.zeros(nrows, dtype=np.float32)
    # An all-zero row keeps scale 0 and encodes as zeros; divide by 1 there. Non-finite input
    # gives a non-finite scale, which the receiver rejects.
    safe = np.where(scale > 0, scale, np.float32(1.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.rint(rows / safe[:, None])
        np.clip(q, -127, 127, out=q)
        q = q.astype(np.int8)
    return q, scale.astype(_SCALE_LE, copy=False)


# --------------------------------------------------------------------------- decoding


def tensor_nbytes(msg: pb.Tensor) -> int:
    """Payload bytes of a ``Tensor`` message on the wire (data plus int8 scales)."""
    return len(msg.data) + len(msg.scales)


def _fmt_shape(shape: Iterable[int | None]) -> str:
    return "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"


def decode_tensor(
    msg: pb.Tensor,
    *,
    expect_shape: Sequence[int | None] | None = None,
    max_elements: int | None = None,
    allow_nonfinite: bool = False,
    out_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    name: str = "tensor",
) -> torch.Tensor:
    """Decode and validate a ``Tensor`` message from a peer.

    Checks, in order: the dtype is known; the declared shape has at most
    :data:`MAX_NDIM` dims and at most ``max_elements`` elements (default: one
    per byte of :data:`DEFAULT_MAX_MESSAGE_BYTES`) — before anything is
    allocated; the shape matches ``expect_shape`` (``None`` entries match any
    size); ``data`` (and for int8 ``scales``) has exactly the declared length;
    the values are finite unless ``allow_nonfinite``.

    Returns a fresh, writable tensor: floating wire dtypes in ``out_dtype``,
    ``INT64`` as ``torch.int64``; on ``device`` (default the CPU), moved there only
    after every check passed. ``name`` is used in error messages
    ("hidden has shape [2, 5, 64], expected [*, *, 576]").
    Raises :class:`WireError` with ``INVALID_ARGUMENT`` or ``RESOURCE_EXHAUSTED``.
    """
    enum = msg.dtype
    if enum not in _ITEMSIZE:
        raise WireError(f"{name} has unknown dtype enum {enum}; expected one of {_known_enums()}")
    if not out_dtype.is_floating_point:  # a caller's bug, not the peer's: no WireError
        raise TypeError(f"out_dtype must be a floating dtype, got {out_dtype}")
    shape = tuple(int(d) for d in msg.shape)
    if len(shape) > MAX_NDIM:
        raise WireError(f"{name} has {len(shape)} dimensions; at most {MAX_NDIM} are accepted")

    limit = DEFAULT_MAX_MESSAGE_BYTES if max_elements is None else max_elements
    # Zero-size dims count as 1 so that e.g. [2**60, 0] is refused too.
    declared = math.prod(max(d, 1) for d in shape)
    if declared > limit:
        raise WireError(
            f"{name} declares shape {_fmt_shape(shape)} ({declared} elements), over the limit of {limit}; "
            "send smaller batches or raise the limit",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    if expect_shape is not None:
        expected = tuple(expect_shape)
        if len(shape) != len(expected) or any(e is not None and e != d for d, e in zip(shape, expected)):
            raise WireError(f"{name} has shape {_fmt_shape(shape)}, expected {_fmt_shape(expected)}")

    numel = math.prod(shape)
    want = numel * _ITEMSIZE[enum]
    if len(msg.data) != want:
        raise WireError(
            f"{name} with dtype {wire_dtype_name(enum)} and shape {_fmt_shape(shape)} needs "
            f"{want} data bytes, got {len(msg.data)}"
        )
    if enum == pb.INT8:
        nrows, _ = _int8_rows(shape)
        if len(msg.scales) != 4 * nrows:
            raise WireError(
                f"{name} is int8 with {nrows} rows and needs {4 * nrows} scale bytes, got {len(msg.scales)}"
            )
    elif msg.scales:
        raise WireError(f"{name} has {len(msg.scales)} scale bytes, but only int8 tensors carry scales")

    t = _read(msg, enum, shape, out_dtype)
    if t.is_floating_point() and not allow_nonfinite and not _all_finite(t):
        raise WireError(f"{name} contains NaN or Inf values")
    return t if device is None else t.to(device)


def _all_finite(t: torch.Tensor) -> bool:
    # numpy's isfinite is several times faster than torch's on CPU for large tensors.
    if t.dtype == torch.bfloat16:
        t = t.to(torch.float32)
    return bool(np.isfinite(t.numpy()).all())


def _read(msg: pb.Tensor, enum: int, shape: tuple[int, ...], out_dtype: torch.dtype) -> torch.Tensor:
    """Bytes to a writable tensor; the caller has checked every length."""
    if enum == pb.INT64:
        return torch.from_numpy(np.frombuffer(msg.data, _LE[pb.INT64]).astype(np.int64)).reshape(shape)
    if enum == pb.INT8:
        q = np.frombuffer(msg.data, np.int8).astype(np.float32).reshape(_int8_rows(shape))
        scales = np.frombuffer(msg.scales, _SCALE_LE).astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            q *= scales[:, None]
        return torch.from_numpy(q).reshape(shape).to(out_dtype)
    if enum == pb.BF16:
        bits = np.frombuffer(msg.data, _LE[pb.BF16]).astype(np.int16)
        return torch.from_numpy(bits).view(torch.bfloat16).reshape(shape).to(out_dtype)
    # FP32 / FP16: one copy into native byte order, upcast in numpy when asked for fp32.
    native = np.float32 if out_dtype == torch.float32 else _LE[enum].newbyteorder("=")
    arr = np.frombuffer(msg.data, _LE[enum]).astype(native)
    return torch.from_numpy(arr).reshape(shape).to(out_dtype)


# --------------------------------------------------------------------------- named tensors and limits


def named_tensors(d: Mapping[str, torch.Tensor], wire_dtype: str = "fp32") -> list[pb.NamedTensor]:
    """Encode a ``{name: tensor}`` dict (e.g. an adapter state dict) as ``NamedTensor`` messages."""
    return [pb.NamedTensor(name=k, tensor=encode_tensor(v, wire_dtype)) for k, v in d.items()]


def from_named_tensors(
    lst: Iterable[pb.NamedTensor],
    *,
    max_elements: int | None = None,
    allow_nonfinite: bool = False,
    out_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Decode ``NamedTensor`` messages into a ``{name: tensor}`` dict, validating each one.

    ``max_elements`` bounds the total over all tensors. Duplicate or empty
    names raise :class:`WireError`.
    """
    out: dict[str, torch.Tensor] = {}
    budget = DEFAULT_MAX_MESSAGE_BYTES if max_elements is None else max_elements
    for item in lst:
        if not item.name:
            raise WireError("a named tensor has an empty name")
        if item.name in out:
            raise WireError(f"tensor name {item.name!r} appears more than once")
        t = decode_tensor(
            item.tensor,
            max_elements=budget,
            allow_nonfinite=allow_nonfinite,
            out_dtype=out_dtype,
            name=item.name,
        )
        budget -= t.numel()
        out[item.name] = t
    return out


def check_message_size(msg: Message, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> int:
    """Return ``msg.ByteSize()``; raise ``RESOURCE_EXHAUSTED`` if it is over ``max_bytes``.

    Call it before sending so that an oversized batch fails with a message
    that says what to do rather than a bare transport error.
    """
    size = msg.ByteSize()
    if size > max_bytes:
        raise WireError(
            f"{type(msg).__name__} is {size} bytes, over the {max_bytes}-byte message limit; "
            "use a smaller batch or sequence length, a smaller wire dtype (fp16, int8), "
            "or raise max_message_bytes on both sides",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    return size


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """gRPC channel/server options that set the send and receive size limits."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
