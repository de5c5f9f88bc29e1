"""Helpers for the federation tests (imported by name; the test folders are not packages)."""

import asyncio

import torch

from fedsplit.model.lora import LoraSettings
from fedsplit.server.session import BodySession
from fedsplit.wire.protocol import SessionConfig

LORA = LoraSettings(rank=4, alpha=8.0)
H = 64  # tiny-llama hidden size


def open_train(servicer, span=(1, 3), seed=3, lr=1e-2, owner="t", warmup=0) -> BodySession:
    """A TRAIN session opened and attached as the servicer does it for a stream."""
    config = servicer.coordinator.prepare(
        SessionConfig(
            span=span,
            mode="train",
            lora=LORA,
            lr=lr,
            warmup_steps=warmup,
            seed=seed,
            max_batch=8,
            max_length=64,
        )
    )
    session = BodySession(servicer.body, servicer.pool, config, owner)
    servicer.sessions[session.id] = session
    session.attached = True
    servicer.coordinator.attach(session)
    return session


def ragged(rows, length, seed):
    """Hidden states [rows, length, H] and left-padding lengths (row 0 unpadded)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, length, H, generator=gen)
    pad = torch.tensor([0] + [int(x) for x in torch.randint(0, length // 2, (rows - 1,), generator=gen)])
    return hidden, pad


def run(coro, timeout=30):
    """Run ``coro`` on a fresh event loop with a deadline."""
    return asyncio.run(asyncio.wait_for(coro, timeout))
