"""What an ``OpenSession`` asks for: the checked request as a :class:`SessionConfig`, and its memory.

The service answers a bad request by ending the stream with the status a
:class:`SessionError` names (:func:`status_code`), so every check here is one line
that says what to change.
"""

from __future__ import annotations

import math

import grpc
import torch

from ..model.lora import LoraSettings
from ..model.segments import Body
from ..wire import codec
from ..wire import fedsplit_pb2 as pb
from ..wire.lora import lora_from_proto
from ..wire.protocol import SessionConfig
from .placement import body_placement
from .session import SessionError

MAX_LENGTH = 1 << 20  # a sanity bound on OpenSession.max_length; the memory budget is the real one


def status_code(name: str) -> grpc.StatusCode:
    """The gRPC status a :class:`SessionError` code names (UNKNOWN for a name gRPC lacks)."""
    return getattr(grpc.StatusCode, name, grpc.StatusCode.UNKNOWN)


def session_config(req: pb.OpenSession, fingerprint: str, model: str) -> tuple[SessionConfig, str]:
    """The session ``req`` asks for and the wire dtype of its tensors; a SessionError if it cannot be served.

    ``fingerprint`` and ``model`` are the server's: a client holding another model is refused.
    """
    if req.model_fingerprint and req.model_fingerprint != fingerprint:
        raise SessionError(
            "FAILED_PRECONDITION",
            f"model mismatch: the server runs {model} (fingerprint {fingerprint}), "
            f"the client has {req.model_fingerprint}",
        )
    mode = {pb.TRAIN: "train", pb.GENERATE: "generate"}.get(req.mode)
    if mode is None:
        raise SessionError("INVALID_ARGUMENT", "mode must be TRAIN or GENERATE")
    try:
        wire_dtype = codec.wire_dtype_name(req.wire_dtype) if req.wire_dtype else codec.DEFAULT_WIRE_DTYPE
    except codec.WireError as exc:
        raise SessionError("INVALID_ARGUMENT", str(exc)) from None
    if req.max_length == 0 or req.max_length > MAX_LENGTH:
        raise SessionError("INVALID_ARGUMENT", f"max_length must be between 1 and {MAX_LENGTH}")
    try:
        lora = lora_from_proto(req.lora) if req.HasField("lora") and req.lora.rank else None
    except codec.WireError as exc:
        raise SessionError("INVALID_ARGUMENT", str(exc)) from None
    for name in ("learning_rate", "weight_decay"):
        value = getattr(req, name)
        ok = math.isfinite(value) and 0 <= value < 1e3 and (value > 0 or name == "weight_decay")
        if req.HasField(name) and not ok:
            raise SessionError(
                "INVALID_ARGUMENT",
                f"{name} must be finite, below 1000 (learning_rate > 0, weight_decay >= 0)",
            )
    config = SessionConfig(
        span=(req.span_start, req.span_end),
        mode=mode,
        max_length=req.max_length,
        max_batch=req.max_batch_size or 1,
        lora=lora,
        lr=req.learning_rate if req.HasField("learning_rate") else 2e-4,
        weight_decay=req.weight_decay if req.HasField("weight_decay") else 0.0,
        warmup_steps=req.warmup_steps,
        seed=req.lora.seed if req.HasField("lora") and req.lora.HasField("seed") else None,
    )
    return config, wire_dtype


def memory_needed(body: Body, config: SessionConfig, dtype: torch.dtype | None = None) -> int:
    """Bytes to reserve for a session: its KV cache (generate), or adapter, AdamW and one graph (train).

    Caches and autograd activations are counted in the body's compute dtype (``dtype``; default:
    the body's own), so a bf16 body admits twice the tokens of an fp32 one; the LoRA adapter, its
    gradient and AdamW moments are fp32 on any body.
    """
    cfg = body.config
    element = (dtype or body_placement(body)[1]).itemsize
    layers = config.span[1] - config.span[0]
    if config.mode == "generate":
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        per_token = 2 * layers * cfg.num_key_value_heads * head_dim * element
        return per_token * config.max_length * config.max_batch
    rank = (config.lora or LoraSettings()).rank
    adapter = layers * 4 * rank * 2 * cfg.hidden_size * 4 * 4  # ~4 targets, A+B, weight+grad+2 moments
    # autograd keeps ~ (6 hidden + 4 intermediate) values per token per layer, plus attention scores
    per_token = (
        layers
        * (6 * cfg.hidden_size + 4 * cfg.intermediate_size + 2 * cfg.num_attention_heads * config.max_length)
        * element
    )
    return adapter + per_token * config.max_length * config.max_batch
