"""Tensor encoding: round trips, byte layout, and rejection of bad input."""

import grpc
import numpy as np
import pytest
import torch

from fedsplit.wire import codec
from fedsplit.wire import fedsplit_pb2 as pb
from fedsplit.wire.codec import WireError, decode_tensor, encode_tensor

SHAPES = [(), (1,), (7,), (3, 5), (2, 5, 64), (1, 1, 576), (2, 3, 4, 5), (0, 4), (3, 0)]


def _rand(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 3.0


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_round_trip_is_exact(shape):
    x = _rand(shape)
    y = decode_tensor(encode_tensor(x, "fp32"))
    assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.equal(x, y)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("wire, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_round_trip_equals_a_local_cast(shape, wire, dtype):
    x = _rand(shape)
    y = decode_tensor(encode_tensor(x, wire))
    assert y.shape == x.shape
    # Same bits as casting locally, so the error is exactly the format's rounding.
    assert torch.equal(y, x.to(dtype).to(torch.float32))
    rel = {"fp16": 2**-11, "bf16": 2**-8}[wire]
    assert torch.all((x - y).abs() <= rel * x.abs() + 1e-7)


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_round_trip_is_within_row_absmax_over_127(shape):
    x = _rand(shape)
    msg = encode_tensor(x, "int8")
    y = decode_tensor(msg)
    assert y.shape == x.shape
    if x.numel() == 0:
        return
    rows = x.reshape(-1, x.shape[-1] if x.dim() else 1)
    bound = rows.abs().amax(dim=1, keepdim=True) / 127.0
    assert torch.all((rows - y.reshape(rows.shape)).abs() <= bound + 1e-6)


def test_int8_zero_row_decodes_to_zeros_without_nan():
    x = _rand((3, 8))
    x[1] = 0.0
    msg = encode_tensor(x, "int8")
    scales = np.frombuffer(msg.scales, "<f4")
    assert scales.shape == (3,) and scales[1] == 0.0
    y = decode_tensor(msg)
    assert torch.isfinite(y).all()
    assert torch.equal(y[1], torch.zeros(8))


def test_int8_carries_one_fp32_scale_per_last_dim_row():
    msg = encode_tensor(_rand((2, 5, 16)), "int8")
    assert len(msg.data) == 2 * 5 * 16
    assert len(msg.scales) == 2 * 5 * 4


def test_bf16_keeps_large_magnitudes_that_fp16_cannot():
    x = torch.tensor([1e30, -3e38, 65504.0 * 4])
    y = decode_tensor(encode_tensor(x, "bf16"))
    assert torch.allclose(y, x, rtol=2**-8)
    with pytest.raises(WireError):
        decode_tensor(encode_tensor(x, "fp16"))  # overflows to inf


@pytest.mark.parametrize("wire, np_dtype", [("fp32", "<f4"), ("fp16", "<f2")])
def test_data_is_little_endian_row_major(wire, np_dtype):
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4) * 1.5 - 4.0
    msg = encode_tensor(x, wire)
    assert msg.data == x.numpy().astype(np_dtype).tobytes()
    assert list(msg.shape) == [3, 4]


def test_int64_data_is_little_endian():
    x = torch.tensor([[1, -2], [2**40, 3]])
    assert encode_tensor(x).data == x.numpy().astype("<i8").tobytes()


def test_bf16_bytes_are_the_top_half_of_little_endian_fp32():
    x = torch.tensor([1.0, -2.0, 0.15625, 3.0e20])  # all exactly representable in bf16
    msg = encode_tensor(x, "bf16")
    f32 = x.numpy().astype("<f4").view("<u4")
    assert msg.data == (f32 >> 16).astype("<u2").tobytes()


def test_integer_tensors_travel_exactly_as_int64():
    x = torch.tensor([[0, 1, -1], [2**40, -(2**62), 7]], dtype=torch.int64)
    msg = encode_tensor(x, "fp16")  # wire dtype only applies to floating tensors
    assert msg.dtype == pb.INT64
    y = decode_tensor(msg)
    assert y.dtype == torch.int64 and torch.equal(x, y)


def test_encode_detaches_and_accepts_non_contiguous_input():
    x = _rand((4, 6)).requires_grad_(True)
    y = decode_tensor(encode_tensor(x.t(), "fp32"))
    assert torch.equal(y, x.detach().t())


def test_decoded_tensor_is_writable_and_owns_its_memory():
    msg = encode_tensor(_rand((2, 3)), "fp32")
    y = decode_tensor(msg)
    y.add_(1.0)  # would fail or warn on a read-only buffer
    assert torch.equal(decode_tensor(msg) + 1.0, y)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("wire", codec.WIRE_DTYPES)
def test_out_dtype_is_honoured(wire, out_dtype):
    y = decode_tensor(encode_tensor(_rand((2, 3)), wire), out_dtype=out_dtype)
    assert y.dtype == out_dtype


def test_wrong_data_length_is_invalid_argument():
    msg = encode_tensor(_rand((2, 3)), "fp16")
    msg.data = msg.data[:-1]
    with pytest.raises(WireError) as err:
        decode_tensor(msg)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "12 data bytes, got 11" in str(err.value)


def test_wrong_int8_scales_length_is_invalid_argument():
    msg = encode_tensor(_rand((2, 3)), "int8")
    msg.scales = msg.scales[:4]
    with pytest.raises(WireError) as err:
        decode_tensor(msg)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_scales_on_a_non_int8_tensor_are_invalid_argument():
    msg = encode_tensor(_rand((2, 3)), "fp32")
    msg.scales = b"\0" * 8
    with pytest.raises(WireError):
        decode_tensor(msg)


@pytest.mark.parametrize("shape", [[1 << 40, 576], [1 << 63, 1 << 63], [1 << 60, 0], [2**64 - 1]])
def test_huge_declared_shape_is_resource_exhausted_before_allocation(shape, monkeypatch):
    def no_alloc(*args, **kwargs):
        raise AssertionError("decode_tensor allocated before checking the declared size")

    monkeypatch.setattr(codec, "_read", no_alloc)
    msg = pb.Tensor(dtype=pb.FP16, shape=shape, data=b"")
    with pytest.raises(WireError) as err:
        decode_tensor(msg)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_max_elements_is_enforced():
    msg = encode_tensor(_rand((4, 8)), "fp32")
    assert decode_tensor(msg, max_elements=32).shape == (4, 8)
    with pytest.raises(WireError) as err:
        decode_tensor(msg, max_elements=31)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_too_many_dimensions_is_invalid_argument():
    msg = pb.Tensor(dtype=pb.FP32, shape=[1] * (codec.MAX_NDIM + 1), data=b"\0" * 4)
    with pytest.raises(WireError) as err:
        decode_tensor(msg)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("wire", ["fp32", "fp16", "bf16"])
def test_nonfinite_values_are_rejected_unless_allowed(wire, bad):
    x = _rand((2, 4))
    x[1, 2] = bad
    msg = encode_tensor(x, wire)
    with pytest.raises(WireError) as err:
        decode_tensor(msg, name="hidden")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "hidden" in str(err.value) and "NaN or Inf" in str(err.value)
    y = decode_tensor(msg, allow_nonfinite=True)
    assert not torch.isfinite(y[1, 2])


def test_int8_with_nonfinite_scale_is_rejected():
    msg = encode_tensor(_rand((2, 4)), "int8")
    msg.scales = np.array([1.0, np.inf], dtype="<f4").tobytes()
    with pytest.raises(WireError):
        decode_tensor(msg)


def test_expect_shape_mismatch_names_both_shapes():
    msg = encode_tensor(_rand((2, 5, 64)), "fp16")
    with pytest.raises(WireError) as err:
        decode_tensor(msg, expect_shape=(None, None, 576), name="hidden")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(err.value) == "hidden has shape [2, 5, 64], expected [*, *, 576]"


def test_expect_shape_rejects_a_different_rank():
    msg = encode_tensor(_rand((10, 576)), "fp16")
    with pytest.raises(WireError, match=r"shape \[10, 576\], expected \[\*, \*, 576\]"):
        decode_tensor(msg, expect_shape=(None, None, 576))


def test_expect_shape_with_wildcards_accepts_a_match():
    msg = encode_tensor(_rand((2, 5, 64)), "fp16")
    assert decode_tensor(msg, expect_shape=(2, None, 64)).shape == (2, 5, 64)


@pytest.mark.parametrize("enum_value", [pb.DTYPE_UNSPECIFIED, 6, 99, -1])
def test_unknown_dtype_enum_is_invalid_argument(enum_value):
    msg = pb.Tensor(dtype=enum_value, shape=[2], data=b"\0" * 8)
    with pytest.raises(WireError) as err:
        decode_tensor(msg)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown dtype" in str(err.value)


def test_wire_dtype_names_and_enums_round_trip():
    for name in (*codec.WIRE_DTYPES, "int64"):
        assert codec.wire_dtype_name(codec.wire_dtype_enum(name)) == name
    assert codec.wire_dtype_enum("FP16") == pb.FP16
    assert codec.wire_dtype_enum("bfloat16") == pb.BF16
    assert codec.DEFAULT_WIRE_DTYPE in codec.WIRE_DTYPES


def test_unknown_wire_dtype_name_says_what_to_use():
    with pytest.raises(WireError, match="fp32, fp16, bf16, int8"):
        codec.wire_dtype_enum("fp8")
    with pytest.raises(WireError):
        codec.wire_dtype_name(0)
    with pytest.raises(WireError):
        encode_tensor(torch.ones(2), "int64")


def test_complex_tensors_cannot_be_sent():
    with pytest.raises(WireError):
        encode_tensor(torch.ones(2, dtype=torch.complex64))


def test_tensor_nbytes_counts_data_and_scales():
    assert codec.tensor_nbytes(encode_tensor(torch.ones(3, 10), "fp16")) == 60
    assert codec.tensor_nbytes(encode_tensor(torch.ones(3, 10), "int8")) == 30 + 12


def test_named_tensors_round_trip():
    state = {"head.lora_A": _rand((4, 8)), "tail.lora_B": _rand((8, 4), seed=1)}
    msgs = codec.named_tensors(state)
    assert [m.name for m in msgs] == list(state)
    back = codec.from_named_tensors(msgs)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_from_named_tensors_rejects_duplicates_and_budget_overruns():
    msgs = codec.named_tensors({"a": torch.ones(4)})
    with pytest.raises(WireError, match="more than once"):
        codec.from_named_tensors(msgs + msgs)
    two = codec.named_tensors({"a": torch.ones(4), "b": torch.ones(4)})
    with pytest.raises(WireError) as err:
        codec.from_named_tensors(two, max_elements=6)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_check_message_size_raises_resource_exhausted_with_advice():
    msg = pb.ClientMessage(forward=pb.Forward(hidden=encode_tensor(torch.ones(1, 4, 64), "fp32")))
    assert codec.check_message_size(msg) == msg.ByteSize()
    with pytest.raises(WireError, match="smaller batch") as err:
        codec.check_message_size(msg, max_bytes=100)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_wire_error_is_a_value_error_with_default_code():
    err = WireError("bad")
    assert isinstance(err, ValueError) and err.code == grpc.StatusCode.INVALID_ARGUMENT


def test_wire_error_converts_to_an_error_reply_with_the_numeric_status():
    reply = WireError("too big", grpc.StatusCode.RESOURCE_EXHAUSTED).to_proto()
    assert reply.code == 8 and reply.message == "too big"
