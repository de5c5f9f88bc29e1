"""Learned inversion: a small model trained to read tokens off the hidden states the server sees.

The attacker runs public auxiliary text through its own copy of the public head,
applies the *same defence* the client uses (the mechanism and its strength are
public; only the client's random draws are not), and trains an inverter to map each
hidden vector back to its token with a per-position cross entropy — the learning-based
attack of FL-LLaMA and VFLAIR-LLM. The inverter is a couple of bidirectional
transformer layers (the server holds the whole sequence, so there is no reason to be
causal) and a vocabulary head over the tokens seen in the auxiliary text (a token
never seen there cannot be learned anyway, and the smaller head makes training
affordable on a CPU). The vocabulary head starts from the public embedding rows.

BiSR-style refinement (:func:`refine`) then uses the inverter's output as the start
of the white-box optimisation of :mod:`fedsplit.attacks.inversion`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .inversion import embedding_matrix, frozen, invert_relaxation, invert_vmi, real_mask

log = logging.getLogger(__name__)

DEFAULT_INVERTER_STEPS = 200
MAX_POSITIONS = 1024


class Inverter(nn.Module):
    """Hidden states ``[B, T, H]`` -> logits over a sub-vocabulary ``[B, T, K]``.

    Args:
        hidden_size: ``H`` of the model whose head output is inverted.
        vocab_ids: the model token id of each output class, ``LongTensor[K]``.
        width: the inverter's model width (default ``min(H, 256)``).
        layers: transformer layers (bidirectional, pre-norm).
        heads: attention heads per layer.
        embedding: optional public embedding table ``[V, H]``; when ``width == H`` the output
            layer starts from its (normalised) rows for ``vocab_ids``.
    """

    def __init__(
        self,
        hidden_size: int,
        vocab_ids: torch.Tensor,
        width: int | None = None,
        layers: int = 2,
        heads: int = 4,
        embedding: torch.Tensor | None = None,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        width = width or min(hidden_size, 256)
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.register_buffer("vocab_ids", vocab_ids.to(torch.long).clone())
        self.in_norm = nn.LayerNorm(hidden_size)
        self.in_proj = nn.Linear(hidden_size, width)
        self.positions = nn.Embedding(MAX_POSITIONS, width)
        nn.init.normal_(self.positions.weight, std=0.02)
        block = nn.TransformerEncoderLayer(
            width, heads, 2 * width, dropout=dropout, batch_first=True, norm_first=True, activation="gelu"
        )
        self.encoder = (
            nn.TransformerEncoder(block, layers, enable_nested_tensor=False) if layers > 0 else None
        )
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, len(vocab_ids))
        if embedding is not None and embedding.shape[1] == width:
            with torch.no_grad():
                rows = F.normalize(embedding[self.vocab_ids].float(), dim=-1)
                self.out.weight.copy_(rows * self.out.weight.norm(dim=-1, keepdim=True).mean())

    def forward(self, hidden: torch.Tensor, pad_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T, K]`` over :attr:`vocab_ids` for every position."""
        batch, length, _ = hidden.shape
        if length > MAX_POSITIONS:
            raise ValueError(f"the inverter handles at most {MAX_POSITIONS} positions, got {length}")
        x = self.in_proj(self.in_norm(hidden.float()))
        if pad_lengths is None:
            pad_lengths = torch.zeros(batch, dtype=torch.long, device=hidden.device)
        # Positions count from the first real token, as the model's own position ids do.
        columns = torch.arange(length, device=hidden.device)
        positions = (columns.view(1, -1) - pad_lengths.view(-1, 1)).clamp(0, MAX_POSITIONS - 1)
        x = x + self.positions(positions)
        if self.encoder is not None:
            x = self.encoder(x, src_key_padding_mask=~real_mask(pad_lengths, length))
        return self.out(self.out_norm(x))

    @torch.no_grad()
    def decode(self, hidden: torch.Tensor, pad_lengths: torch.Tensor | None = None, batch_size: int = 64):
        """Most likely model token id at every position, ``[B, T]``."""
        was_training = self.training
        self.eval()
        pad_lengths = (
            pad_lengths
            if pad_lengths is not None
            else torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
        )
        out = [
            self.vocab_ids[self(hidden[s : s + batch_size], pad_lengths[s : s + batch_size]).argmax(-1)]
            for s in range(0, hidden.shape[0], batch_size)
        ]
        self.train(was_training)
        return torch.cat(out)


def head_outputs(
    head: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    progress: bool,
    defense: nn.Module | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Head outputs of the auxiliary batches: ``(ids, pad, hidden)`` each, ``ids`` the true tokens.

    A text-level defence in ``defense`` (its ``token_defense``) replaces the ids the head reads,
    as the client's does (one draw per batch); the hidden-state part of the defence is applied
    later, afresh at each training step, by :func:`fit_per_position`.
    """
    token_defense = getattr(defense, "token_defense", None)
    out = []
    with frozen(head), torch.no_grad():
        for ids, pad in tqdm(list(batches), desc="aux hidden states", disable=not progress, leave=False):
            read = token_defense.perturb(ids, pad, 0) if token_defense is not None else ids
            out.append((ids, pad, head(read, pad)))
    return out


def train_inverter(
    head: nn.Module,
    aux_token_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    defense: nn.Module | None = None,
    *,
    steps: int = DEFAULT_INVERTER_STEPS,
    layers: int = 2,
    width: int | None = None,
    lr: float = 2e-3,
    seed: int = 0,
    ignore_ids: Iterable[int] = (),
    progress: bool = True,
) -> Inverter:
    """Train an :class:`Inverter` on public text passed through the public head and the defence.

    Args:
        head: the attacker's copy of the public head.
        aux_token_batches: ``(input_ids [b, T], pad_lengths [b])`` batches of public text,
            left-padded; iterated once (their clean head outputs are cached).
        defense: the client's defence *mechanism* (a fresh instance built from the same
            spec); applied anew at every step, so the inverter sees fresh noise draws.
        steps: optimiser steps (one auxiliary batch each, cycling).
        layers: transformer layers of the inverter (0 gives a per-token MLP-free linear probe).
        width: inverter width (default ``min(H, 256)``).
        lr: AdamW learning rate (linear warm-up, cosine decay).
        seed: seeds the inverter's initialisation and the batch order.
        ignore_ids: token ids left out of the loss (pad, special tokens).

    Returns:
        The trained inverter, in eval mode.
    """
    cached = head_outputs(head, aux_token_batches, progress, defense)
    if not cached:
        raise ValueError("train_inverter needs at least one auxiliary batch")
    ignore = torch.tensor(
        sorted(set(int(i) for i in ignore_ids)), dtype=torch.long, device=cached[0][0].device
    )
    seen = torch.unique(torch.cat([ids[real_mask(pad, ids.shape[1])] for ids, pad, _ in cached]))
    vocab_ids = seen[~torch.isin(seen, ignore)]
    if len(vocab_ids) == 0:
        raise ValueError("the auxiliary text has no token that is not ignored")
    table = embedding_matrix(head)
    lookup = torch.full((table.shape[0],), -100, dtype=torch.long, device=table.device)
    lookup[vocab_ids] = torch.arange(len(vocab_ids), device=table.device)

    # Dropout and the defence's noise draw from the global generator: seed a forked one.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inverter = Inverter(table.shape[1], vocab_ids, width=width, layers=layers, embedding=table)
        inverter.to(table.device)  # the attacker trains where the public head runs
        log.info(
            "training an inverter: %d aux batches, %d output tokens, %d steps",
            len(cached),
            len(vocab_ids),
            steps,
        )
        loss = fit_per_position(inverter, cached, lookup, defense, steps=steps, lr=lr, progress=progress)
    log.info("inverter trained: last batch loss %.3f", loss)
    return inverter.eval()


def fit_per_position(
    model: nn.Module,
    cached,
    lookup: torch.Tensor,
    defense,
    *,
    steps: int,
    lr: float,
    progress: bool,
    clip_norm: float | None = 1.0,
    desc: str = "train inverter",
) -> float:
    """Train ``model(hidden, pad) -> logits [B, T, K]`` to name each real position's token class.

    AdamW with linear warm-up and cosine decay; one cached (ids, pad, clean hidden) batch per step
    with fresh defence draws, as the attacker sees them. Used by the inverter and the probe.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    order: list[int] = []
    loss = torch.tensor(float("nan"))
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        if not order:
            order = torch.randperm(len(cached)).tolist()
        ids, pad, hidden = cached[order.pop()]
        if defense is not None:
            with torch.no_grad():
                hidden = defense(hidden, pad)
        targets = lookup[ids].masked_fill(~real_mask(pad, ids.shape[1]), -100)
        logits = model(hidden.detach(), pad)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        schedule.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss.item()


def refine(
    head: nn.Module,
    hidden: torch.Tensor,
    pad_lengths: torch.Tensor,
    start_ids: torch.Tensor,
    *,
    method: str = "vmi",
    steps: int = 50,
    vocab_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    **kwargs,
) -> torch.Tensor:
    """BiSR-style refinement: optimise from the learned guess ``start_ids`` to fit ``hidden`` better.

    ``method`` is ``"vmi"`` (start from the guessed tokens' embeddings) or ``"relaxation"``
    (start with the guessed tokens holding the largest logits). Returns ids ``[B, T]``.
    """
    table = embedding_matrix(head, vocab_size)
    start_ids = start_ids.clamp(max=table.shape[0] - 1)
    if method == "vmi":
        return invert_vmi(
            head,
            hidden,
            pad_lengths,
            steps=steps,
            init=table[start_ids],
            vocab_size=vocab_size,
            seed=seed,
            progress=progress,
            **kwargs,
        )
    if method == "relaxation":
        return invert_relaxation(
            head,
            hidden,
            pad_lengths,
            steps=steps,
            init_ids=start_ids,
            init_embeds=table[start_ids],
            vocab_size=vocab_size,
            seed=seed,
            progress=progress,
            **kwargs,
        )
    raise ValueError(f"refinement method must be 'vmi' or 'relaxation', got {method!r}")
