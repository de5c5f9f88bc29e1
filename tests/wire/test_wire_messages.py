"""The protobuf schema: message layout, per-token overhead, generated stubs."""

import os
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import torch

from fedsplit.wire import codec
from fedsplit.wire import fedsplit_pb2 as pb
from fedsplit.wire import fedsplit_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
WIRE = ROOT / "src" / "fedsplit" / "wire"
HIDDEN = 576  # SmolLM2-135M


def _one_token_forward(wire_dtype):
    """A realistic decode step: batch 1, one token, deep into the cache, large ids."""
    hidden = torch.randn(1, 1, HIDDEN)
    return pb.ClientMessage(
        seq=2**40,
        forward=pb.Forward(
            step_id=2**40,
            hidden=codec.encode_tensor(hidden, wire_dtype),
            pad_lengths=[3],
            position_offset=8191,
            use_cache=True,
        ),
    )


@pytest.mark.parametrize("wire_dtype, itemsize", [("fp16", 2), ("fp32", 4)])
def test_one_token_forward_overhead_is_small(wire_dtype, itemsize):
    msg = _one_token_forward(wire_dtype)
    assert msg.ByteSize() <= 1.05 * HIDDEN * itemsize + 64
    assert len(msg.SerializeToString()) == msg.ByteSize()


@pytest.mark.parametrize("wire_dtype, itemsize", [("fp16", 2), ("fp32", 4)])
def test_one_token_forward_result_overhead_is_small(wire_dtype, itemsize):
    reply = pb.ServerMessage(
        seq=2**40,
        forward_result=pb.ForwardResult(
            step_id=2**40, hidden=codec.encode_tensor(torch.randn(1, 1, HIDDEN), wire_dtype)
        ),
    )
    assert reply.ByteSize() <= 1.05 * HIDDEN * itemsize + 64


def test_client_message_round_trips_through_bytes():
    msg = _one_token_forward("fp16")
    back = pb.ClientMessage.FromString(msg.SerializeToString())
    assert back.WhichOneof("kind") == "forward"
    assert back == msg
    t = codec.decode_tensor(back.forward.hidden, expect_shape=(None, None, HIDDEN))
    assert t.shape == (1, 1, HIDDEN)


def test_client_and_server_messages_have_the_documented_oneofs():
    client = [f.name for f in pb.ClientMessage.DESCRIPTOR.oneofs_by_name["kind"].fields]
    server = [f.name for f in pb.ServerMessage.DESCRIPTOR.oneofs_by_name["kind"].fields]
    assert client == ["open", "forward", "backward", "step", "close", "fetch_adapter", "put_adapter"]
    assert server == ["opened", "forward_result", "backward_result", "step_done", "error", "adapter"]
    assert "seq" in pb.ClientMessage.DESCRIPTOR.fields_by_name
    assert "seq" in pb.ServerMessage.DESCRIPTOR.fields_by_name


def test_open_session_optional_fields_have_presence():
    msg = pb.OpenSession(span_start=3, span_end=27, mode=pb.TRAIN, wire_dtype=pb.FP16, max_length=512)
    for field in ("learning_rate", "weight_decay", "resume_session_id", "lora"):
        assert not msg.HasField(field)
    msg.learning_rate = 0.0
    assert msg.HasField("learning_rate")
    assert not pb.OptimizerStep().HasField("grad_clip_norm")


def test_unset_enums_are_the_unspecified_values():
    assert pb.Tensor().dtype == pb.DTYPE_UNSPECIFIED
    assert pb.OpenSession().mode == pb.MODE_UNSPECIFIED
    with pytest.raises(codec.WireError):
        codec.decode_tensor(pb.Tensor(shape=[1], data=b"\0\0\0\0"))


def test_service_has_session_info_and_adapters():
    service = pb.DESCRIPTOR.services_by_name["SplitService"]
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"Session", "Info", "Adapters"}
    assert methods["Session"].client_streaming and methods["Session"].server_streaming
    assert not methods["Info"].client_streaming and not methods["Info"].server_streaming
    assert methods["Adapters"].input_type.name == "AdapterUpload"
    assert methods["Adapters"].output_type.name == "AdapterReply"
    assert pb.DESCRIPTOR.package == "fedsplit.v1"


def test_every_message_field_and_enum_value_in_the_proto_is_commented():
    """The .proto is the documentation: no declaration without a comment right above it."""
    lines = (ROOT / "proto" / "fedsplit.proto").read_text().splitlines()
    missing = []
    for i, line in enumerate(lines):
        code = line.strip()
        is_decl = code.endswith(";") and "=" in code and not code.startswith(("syntax", "//"))
        is_block = code.startswith(("message ", "enum ", "rpc ", "service "))
        if (is_decl or is_block) and not lines[i - 1].strip().startswith("//"):
            missing.append(f"line {i + 1}: {code}")
    assert not missing, "undocumented declarations:\n" + "\n".join(missing)


def test_grpc_stub_imports_its_pb2_relative_to_the_package():
    text = (WIRE / "fedsplit_pb2_grpc.py").read_text()
    assert "from . import fedsplit_pb2 as fedsplit__pb2" in text
    assert "\nimport fedsplit_pb2" not in text
    assert pb_grpc.fedsplit__pb2 is pb


def test_committed_stubs_match_the_proto(tmp_path):
    """scripts/gen_proto.sh was run after the last .proto change."""
    env = dict(os.environ, OUT_DIR=str(tmp_path), PROTO_PYTHON=sys.executable)
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_proto.sh")], check=True, env=env, capture_output=True)
    for name in ("fedsplit_pb2.py", "fedsplit_pb2.pyi", "fedsplit_pb2_grpc.py"):
        assert (tmp_path / name).read_text() == (WIRE / name).read_text(), f"{name} is stale: run make proto"


class _InfoOnly(pb_grpc.SplitServiceServicer):
    def Info(self, request, context):
        return pb.InfoReply(
            model_name="tiny",
            held_start=0,
            held_end=4,
            hidden_size=HIDDEN,
            num_layers=4,
            wire_dtypes=[pb.FP32, pb.FP16],
            modes=[pb.TRAIN, pb.GENERATE],
            max_message_bytes=codec.DEFAULT_MAX_MESSAGE_BYTES,
            protocol_version=codec.PROTOCOL_VERSION,
        )


def test_generated_stub_and_servicer_talk_over_a_real_channel():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=codec.channel_options())
    pb_grpc.add_SplitServiceServicer_to_server(_InfoOnly(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=codec.channel_options()) as channel:
            reply = pb_grpc.SplitServiceStub(channel).Info(pb.InfoRequest(), timeout=10)
            assert reply.hidden_size == HIDDEN and list(reply.wire_dtypes) == [pb.FP32, pb.FP16]
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.SplitServiceStub(channel).Adapters(pb.AdapterUpload(round=1), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(grace=None)
