"""LoRA hyper-parameters on the wire."""

from __future__ import annotations

import math

from ..model.lora import LoraSettings
from . import fedsplit_pb2 as pb
from .codec import WireError


def lora_to_proto(settings: LoraSettings) -> pb.LoraConfig:
    return pb.LoraConfig(
        rank=settings.rank,
        alpha=settings.alpha,
        dropout=settings.dropout,
        target_modules=list(settings.targets),
    )


def lora_from_proto(msg: pb.LoraConfig) -> LoraSettings:
    if msg.rank == 0 or msg.rank > 4096:
        raise WireError(f"LoRA rank must be 1..4096, got {msg.rank}")
    if not (math.isfinite(msg.alpha) and 0 <= msg.alpha <= 1e6):
        raise WireError(f"LoRA alpha must be a finite number in [0, 1e6] (0 = 2 * rank), got {msg.alpha}")
    if not (0.0 <= msg.dropout < 1.0):  # also false for NaN
        raise WireError(f"LoRA dropout must be in [0, 1), got {msg.dropout}")
    if any(not name or not name.isidentifier() for name in msg.target_modules):
        raise WireError(
            f"LoRA target modules must be module names like q_proj, got {list(msg.target_modules)}"
        )
    return LoraSettings(
        msg.rank,
        msg.alpha or 2.0 * msg.rank,
        msg.dropout,
        tuple(msg.target_modules) or LoraSettings().targets,
    )
