"""The data owner's side: head and tail, the split train step, and generation with split KV caches.

The client talks to the body through a *session* object with four calls —
``forward``, ``backward``, ``step``, ``close`` — whether the body is in this process
(:class:`LocalTransport`) or behind gRPC (:class:`fedsplit.client.remote.RemoteTransport`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.segments import Head, KVCache, Tail
from ..wire.protocol import BodyHandle, SessionConfig, Transport

log = logging.getLogger(__name__)


class LocalTransport:
    """The body in this process (tests, ``--local``): same session code as the server runs."""

    def __init__(self, body, pool=None) -> None:
        from ..server.local import adapter_pool

        self.body = body
        self.pool = pool or adapter_pool(body)

    def open(self, config: SessionConfig) -> BodyHandle:
        from ..server.local import open_session

        return open_session(self.body, self.pool, config)

    @property
    def span(self) -> tuple[int, int]:
        return self.body.span


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy; -100 labels (prompt, padding) are ignored."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] mask of positions whose next token is a label: the only logits the loss needs."""
    select = torch.zeros_like(labels, dtype=torch.bool)
    select[:, :-1] = labels[:, 1:] != -100
    return select


def tail_loss(tail, hidden: torch.Tensor, pad_lengths: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``lm_loss(tail(hidden), labels)``, projecting only the positions that have a label."""
    select = answer_positions(labels)
    logits = tail(hidden, pad_lengths, select=select)
    return F.cross_entropy(logits.float(), labels[:, 1:][select[:, :-1]])


@dataclass
class StepResult:
    loss: float
    tokens: int


class SplitClient:
    """Head + tail of a split model, driving a body session.

    ``defense`` transforms hidden states before they leave; ``grad_defense`` transforms
    the gradient copy sent back to the server (the client's own backward stays clean).
    ``taps`` are callables ``tap(sent, pad_lengths)`` that :meth:`send` calls with every
    tensor as it leaves the client (after the defence, detached): how ``fedsplit audit`` sees
    what the server sees. A tap only reads: it must not modify the tensor it is given.
    """

    def __init__(
        self,
        head: Head,
        tail: Tail,
        transport: Transport,
        span: tuple[int, int],
        defense: torch.nn.Module | None = None,
        grad_defense: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.head, self.tail, self.transport, self.span = head, tail, transport, span
        self.defense = defense
        self.grad_defense = grad_defense
        self._steps = itertools.count(1)
        self.train_session: BodyHandle | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.body_adapter = None  # (LoraSettings, state) pushed into inference sessions, e.g. from --adapters
        self._score_session: BodyHandle | None = None
        self.taps: list[Callable[[torch.Tensor, torch.Tensor], None]] = []  # readers of what send() returns

    @property
    def device(self) -> torch.device:
        """Where the head (and the tail) compute: every tensor the client makes goes there."""
        return next(self.head.parameters()).device

    def on_device(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The tensors a caller hands in (token ids, labels, pad lengths: CPU from the task layer)
        moved to the head's device; the one place data enters the client."""
        return tuple(t.to(self.device) for t in tensors)

    # ------------------------------------------------------------------ training

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = [p for m in (self.head, self.tail) for p in m.parameters() if p.requires_grad]
        if self.defense is not None:
            params += [p for p in self.defense.parameters() if p.requires_grad]
        return params

    def start_training(self, config: SessionConfig, lr: float = 2e-4, weight_decay: float = 0.0) -> None:
        self.train_session = self.transport.open(config)
        params = self.trainable_parameters()
        self.optimizer = (
            torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True) if params else None
        )

    def send(self, hidden: torch.Tensor, pad_lengths: torch.Tensor) -> torch.Tensor:
        """The hidden states as they leave the client: after the defence; each tap sees them (detached)."""
        sent = self.defense(hidden, pad_lengths) if self.defense is not None else hidden
        for tap in self.taps:
            tap(sent.detach(), pad_lengths)
        return sent

    def run_head(
        self,
        ids: torch.Tensor,
        pad_lengths: torch.Tensor,
        cache: KVCache | None = None,
        offset: int | None = None,
    ) -> torch.Tensor:
        """The head, with the defence's input-side hooks: a text-level defence replaces the ids it
        reads, and trained defences (NoPeek, adversarial) see the ids and input embeddings."""
        if self.defense is None:
            return self.head(ids, pad_lengths, cache, offset)
        start = offset if offset is not None else (cache.length if cache is not None else 0)
        token_defense = self.defense.token_defense
        true_ids = ids
        if token_defense is not None:
            ids = token_defense.perturb(ids, pad_lengths, start)
        embeds = self.head.embed_tokens(ids)
        self.defense.observe_inputs(ids, embeds, pad_lengths, start)
        out = self.head(pad_lengths=pad_lengths, cache=cache, offset=offset, inputs_embeds=embeds)
        if token_defense is not None and getattr(self.defense, "bypasses", False) and cache is None:
            # textdx + bypass: the client's own residual stream carries the true text (a second,
            # gradient-free run of the head); with a KV cache the head runs once, on the perturbed ids.
            with torch.no_grad():
                self.defense.set_reference(self.head(true_ids, pad_lengths, None, offset))
        return out

    def tail_input(self, received: torch.Tensor) -> torch.Tensor:
        """What the tail reads: the body's output, less what the client itself added to the residual
        stream before sending (``bypass``), which the body carried through unchanged."""
        correction = self.defense.residual_correction() if self.defense is not None else None
        return received if correction is None else received - correction.to(received.dtype)

    def loss_and_backward(self, batch: dict) -> tuple[torch.Tensor, int]:
        """Forward head → body → tail and backward tail → body → head; gradients accumulate, no step."""
        if self.train_session is None:
            raise RuntimeError("call start_training() first")
        ids, labels, pad = self.on_device(batch["input_ids"], batch["labels"], batch["pad_lengths"])
        step_id = next(self._steps)
        hidden = self.run_head(ids, pad)
        sent = self.send(hidden, pad)
        received = self.train_session.forward(step_id, sent.detach(), pad, 0).requires_grad_()
        loss = tail_loss(self.tail, self.tail_input(received), pad, labels)
        loss.backward()
        grad_out = received.grad
        grad_sent = self.grad_defense(grad_out) if self.grad_defense is not None else grad_out
        grad_in = self.train_session.backward(step_id, grad_sent)
        # The head learns from what the body really returned; a defence with its own
        # objective (MID's KL term) adds it here.
        roots, grads = [], []
        if sent.requires_grad:
            roots, grads = [sent], [grad_in]
        extra = self.defense.extra_loss() if self.defense is not None else None
        if extra is not None and extra.requires_grad:
            roots.append(extra)
            grads.append(torch.ones_like(extra))
        if roots:
            torch.autograd.backward(roots, grads)
        tokens = int(ids.shape[0] * ids.shape[1] - pad.sum())  # real tokens processed (not padding)
        return loss.detach(), tokens

    def optimizer_step(self, clip_norm: float = 0.0, checkpoint: bool = False) -> None:
        """Step the head/tail optimiser and the body's; ``checkpoint`` asks the server to save the run too."""
        if self.optimizer is not None:
            if clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), clip_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if checkpoint:
            self.train_session.step(clip_norm, checkpoint=True)
        else:
            self.train_session.step(clip_norm)

    def train_step(self, batch: dict, clip_norm: float = 0.0, checkpoint: bool = False) -> StepResult:
        loss, tokens = self.loss_and_backward(batch)
        self.optimizer_step(clip_norm, checkpoint)
        return StepResult(float(loss), tokens)

    # ------------------------------------------------------------------ inference

    def open_inference(self, max_length: int, batch: int) -> BodyHandle:
        """A generate session carrying the body adapter being trained (or loaded), if any."""
        session = self.transport.open(
            SessionConfig(span=self.span, mode="generate", max_length=max_length, max_batch=batch)
        )
        adapter = self.train_session.adapter_state() if self.train_session is not None else self.body_adapter
        if adapter is not None and adapter[1]:
            session.put_adapter(*adapter)
        return session

    def logits(self, input_ids: torch.Tensor, pad_lengths: torch.Tensor) -> torch.Tensor:
        """One full forward, no cache, no graph: for scoring and evaluation.

        The logits come back on ``input_ids``' device (the task layer's CPU), in the tail's dtype.
        """
        batch, length = input_ids.shape
        caller = input_ids.device
        input_ids, pad_lengths = self.on_device(input_ids, pad_lengths)
        if self.train_session is not None:
            session = self.train_session  # its adapter, without keeping a graph
        else:
            current = self._score_session
            if current is None or current.config.max_length < length or current.config.max_batch < batch:
                if current is not None:
                    current.close()
                self._score_session = self.open_inference(max(length, 256), max(batch, 8))
            session = self._score_session
        with torch.no_grad():
            hidden = self.send(self.run_head(input_ids, pad_lengths), pad_lengths)
            hidden = session.forward(0, hidden, pad_lengths, 0, keep_graph=False, use_cache=False)
            return self.tail(self.tail_input(hidden), pad_lengths).to(caller)

    def generate(
        self,
        input_ids: torch.Tensor,
        pad_lengths: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        eos_token_id: int | list[int] | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        on_token: Callable[[torch.Tensor], None] | None = None,
        session: BodyHandle | None = None,
        caches: tuple[KVCache, KVCache] | None = None,
        offset: int = 0,
    ) -> torch.Tensor:
        """Prefill once, then one hidden vector per sequence each way per token.

        Returns the new tokens [B, <= max_new_tokens] on ``input_ids``' device; they are sampled
        on the head's device (``on_token`` sees them there). Pass ``session``/``caches``/``offset``
        to continue a conversation whose prefix is already cached on both sides.
        """
        batch, prompt_len = input_ids.shape
        caller = input_ids.device
        if pad_lengths is None:
            pad_lengths = torch.zeros(batch, dtype=torch.long)
        input_ids, pad_lengths = self.on_device(input_ids, pad_lengths)
        own_session = session is None
        if own_session:
            session = self.open_inference(prompt_len + max_new_tokens, batch)
        head_cache, tail_cache = caches or (KVCache(), KVCache())
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        eos_ids = torch.tensor(sorted(eos), dtype=torch.long, device=self.device)
        out = []
        try:
            with torch.no_grad():
                step_input = input_ids
                for t in range(max_new_tokens):
                    hidden = self.send(
                        self.run_head(step_input, pad_lengths, head_cache, offset), pad_lengths
                    )
                    hidden = session.forward(t, hidden, pad_lengths, offset)
                    logits = self.tail(
                        self.tail_input(hidden), pad_lengths, tail_cache, offset, last_only=True
                    )[:, -1]
                    offset += step_input.shape[1]
                    token = sample(logits, temperature, top_p)
                    if eos:
                        fill = next(iter(eos))
                        token = torch.where(finished, torch.full_like(token, fill), token)
                        finished |= torch.isin(token, eos_ids)
                    out.append(token)
                    if on_token is not None:
                        on_token(token)
                    if bool(finished.all()):
                        break
                    step_input = token.unsqueeze(1)
        finally:
            if own_session:
                session.close()
        new = torch.stack(out, dim=1) if out else torch.zeros(batch, 0, dtype=torch.long)
        return new.to(caller)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0) -> torch.Tensor:
    """Greedy when temperature is 0; otherwise temperature + nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1).squeeze(-1)
