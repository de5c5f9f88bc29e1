"""The types both sides of a body session share: what a client asks for, and what it talks to.

The server builds its sessions from a :class:`SessionConfig`; the client opens them through a
:class:`Transport` and drives them through a :class:`BodyHandle`, whether the body runs in this
process (``fedsplit.server.local``) or behind gRPC (``fedsplit.client.remote``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..model.lora import LoraSettings


@dataclass
class SessionConfig:
    """What a client asks for when it opens a session."""

    span: tuple[int, int]
    mode: str = "generate"  # "train" | "generate"
    max_length: int = 2048
    max_batch: int = 8
    lora: LoraSettings | None = None
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0  # train: lr ramps up linearly over the adapter's first optimiser steps
    adapter: str | None = None  # train: share a named adapter instead of a private one
    seed: int | None = None  # LoRA init seed (same layer, same init, wherever it runs)
    run_id: str | None = None  # train: a named run whose adapter the server checkpoints and restores
    resume_steps: tuple[int, ...] = ()  # train with run_id: steps the client can resume from (empty: latest)


class BodyHandle(Protocol):
    """What a client needs from a body session, local or remote."""

    def forward(
        self,
        step_id: int,
        hidden: torch.Tensor,
        pad_lengths: torch.Tensor,
        offset: int = 0,
        keep_graph: bool = True,
        use_cache: bool = True,
    ) -> torch.Tensor: ...
    def backward(self, step_id: int, grad: torch.Tensor) -> torch.Tensor: ...
    def step(self, clip_norm: float = 0.0) -> None: ...
    def close(self) -> None: ...


class Transport(Protocol):
    def open(self, config: SessionConfig) -> BodyHandle: ...
