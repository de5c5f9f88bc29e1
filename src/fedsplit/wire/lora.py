"""LoRA hyper-parameters on the wire."""

from __future__ import annotations

from ..model.lora import LoraSettings
from . import fedsplit_pb2 as pb
from .codec import WireError


def lora_to_proto(settings: LoraSettings) -> pb.LoraConfig:
    return pb.LoraConfig(
        rank=settings.rank, alpha=settings.alpha, dropout=settings.dropout, target_modules=list(settings.targets)
    )


def lora_from_proto(msg: pb.LoraConfig) -> LoraSettings:
    if msg.rank == 0 or msg.rank > 4096:
        raise WireError(f"LoRA rank must be 1..4096, got {msg.rank}")
    return LoraSettings(
        msg.rank, msg.alpha or 2.0 * msg.rank, msg.dropout, tuple(msg.target_modules) or LoraSettings().targets
    )
