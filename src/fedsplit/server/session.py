"""One client's session with the body: its span, KV cache, pending autograd graphs and optimiser.

Pure torch: the gRPC service wraps these objects, and the in-process transport
uses them directly, so both paths run the same code.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from ..model.lora import LoraSettings
from ..model.segments import Body, KVCache
from ..wire import codec
from ..wire.protocol import SessionConfig
from .adapters import AdapterPool
from .config import ServerConfig


class SessionError(Exception):
    """A request the session cannot serve; ``code`` names the gRPC status (e.g. "INVALID_ARGUMENT")."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class SessionLost(Exception):
    """The session's state is gone (a pipeline stage of the body restarted): the service ends its
    stream with UNAVAILABLE and the client opens it again (a named run resumes from its checkpoint)."""


def warm_up(optimizer: torch.optim.Optimizer, lr: float, warmup_steps: int) -> None:
    """Set the lr of the optimiser's next step: ``lr * min(1, k / warmup_steps)`` for its k-th step.

    k is read from the optimiser's own state, so a shared optimiser (stepped by many
    sessions) and one restored from a checkpoint both count the adapter's steps.
    """
    if warmup_steps <= 0:
        return
    done = max((int(state.get("step", 0)) for state in optimizer.state.values()), default=0)
    for group in optimizer.param_groups:
        group["lr"] = lr * min(1.0, (done + 1) / warmup_steps)


@dataclass
class _Graph:
    inputs: torch.Tensor
    outputs: torch.Tensor
    versions: tuple[int, ...] = ()  # the adapter weights' in-place versions at the forward
    caller: tuple[torch.device, torch.dtype] | None = None  # where the input grad goes back to
    created: float = field(default_factory=time.monotonic)


_ids = itertools.count(1)


def _to(tensor: torch.Tensor, place: tuple[torch.device, torch.dtype] | None) -> torch.Tensor:
    """``tensor`` on ``place``'s device in its dtype (itself when it is there already)."""
    return tensor if place is None else tensor.to(device=place[0], dtype=place[1])


def check_session_config(config: SessionConfig, held: tuple[int, int]) -> None:
    """Refuse a session whose span lies outside the ``held`` layers or whose mode is unknown."""
    start, end = config.span
    if not (held[0] <= start <= end <= held[1]):
        raise SessionError(
            "OUT_OF_RANGE",
            f"body span [{start}, {end}) is outside the layers this server holds {list(held)}",
        )
    if config.mode not in ("train", "generate"):
        raise SessionError("INVALID_ARGUMENT", f"mode must be train or generate, not {config.mode!r}")


class BodySession:
    """Runs the body span for one client; owns its cache (generate) or graphs + optimiser (train)."""

    def __init__(
        self,
        body: Body,
        pool: AdapterPool,
        config: SessionConfig,
        owner: str = "local",
        max_graphs: int = ServerConfig.max_graphs,  # the dataclass defaults: one source for both
        graph_ttl: float = ServerConfig.graph_ttl,
    ) -> None:
        check_session_config(config, body.span)
        self.id = f"s{next(_ids)}-{owner}"
        self.owner = owner
        self.body, self.pool, self.config = body, pool, config
        self.cache: KVCache | None = KVCache() if config.mode == "generate" else None
        self.graphs: dict[int, _Graph] = {}
        self.max_graphs, self.graph_ttl = max_graphs, graph_ttl
        self.last_used = time.monotonic()  # the service parks and evicts by it
        self.adapter: str | None = config.adapter  # a coordinator may name a shared one (SessionConfig)
        # AdamW of the adapter; a shared-adapter coordinator replaces it with the one all its clients use.
        self.optimizer: torch.optim.Optimizer | None = None
        self._adapter_params: list[torch.nn.Parameter] = []  # a train session's body LoRA weights
        # Optimiser steps applied to this session's adapter: counted by step(), by a client-batch
        # round's step, and set by RunCheckpoints.restore when a run resumes.
        self.steps = 0
        self.run_id: str | None = config.run_id  # a named training run (fedsplit.server.checkpoint)
        # The latest step of the run on disk; None until RunCheckpoints.restore has opened the run.
        self.saved_step: int | None = None
        self.attached = False  # the service: a stream carries it now (else parked, awaiting a resume)
        # The client continues earlier work: set by the service when a stream re-attaches, and by
        # RunCheckpoints.restore when a run starts from a saved step (SessionOpened.resumed).
        self.resumed = False
        self.wire_dtype: str = codec.DEFAULT_WIRE_DTYPE  # the service: OpenSession.wire_dtype of replies
        if config.mode == "train":
            if self.adapter is None:
                self.adapter = f"session_{self.id}"
                pool.create(self.adapter, config.lora or LoraSettings(), config.seed)
            elif self.adapter not in pool.settings:
                pool.create(self.adapter, config.lora or LoraSettings(), config.seed)
            params = self._adapter_params = pool.parameters(self.adapter)
            # An empty body span has nothing to train; steps are then no-ops.
            self.optimizer = (
                torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, foreach=True)
                if params
                else None
            )

    @property
    def hidden_size(self) -> int:
        return int(self.body.config.hidden_size)

    def to_body(self, hidden: torch.Tensor, pad_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden`` in the body's dtype and both on its device (no copy when they already are).

        The service decodes wire tensors there already; an in-process client may hold its head
        on another device or in another dtype.
        """
        pool = self.pool
        return hidden.to(device=pool.device, dtype=pool.dtype), pad_lengths.to(device=pool.device)

    def check_inputs(self, hidden: torch.Tensor, pad_lengths: torch.Tensor, offset: int | None) -> None:
        """Raise :class:`SessionError` if a forward's inputs do not fit this session.

        ``offset`` None: a stateless call (holds nothing afterwards, so only the shapes are
        checked); otherwise the batch, length and pad limits, and the KV cache position.
        Coordinators and the decode batcher call it before they run a forward their own way.
        """
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise SessionError(
                "INVALID_ARGUMENT",
                f"hidden has shape {list(hidden.shape)}, expected [batch, tokens, {self.hidden_size}]",
            )
        batch, tokens = hidden.shape[:2]
        cache_offset, offset = offset, offset or 0
        if pad_lengths.shape != (batch,):
            raise SessionError(
                "INVALID_ARGUMENT", f"pad_lengths has {pad_lengths.numel()} rows, hidden has {batch}"
            )
        if cache_offset is None:
            return  # stateless: holds nothing after the call; the message size bounds it
        if batch > self.config.max_batch:
            raise SessionError(
                "INVALID_ARGUMENT", f"batch {batch} exceeds the session's max_batch {self.config.max_batch}"
            )
        if offset + tokens > self.config.max_length:
            raise SessionError(
                "OUT_OF_RANGE",
                f"{offset + tokens} tokens exceed the session's max_length {self.config.max_length}",
            )
        if bool((pad_lengths > offset + tokens).any()):
            raise SessionError("INVALID_ARGUMENT", "a pad length exceeds the sequence length")
        if cache_offset is not None and self.cache is not None and offset != self.cache.length:
            raise SessionError(
                "FAILED_PRECONDITION",
                f"position offset {offset} does not match the cache length {self.cache.length}",
            )

    def forward(
        self,
        step_id: int,
        hidden: torch.Tensor,
        pad_lengths: torch.Tensor,
        offset: int = 0,
        keep_graph: bool = True,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Body forward over the session's span.

        Train sessions keep the autograd graph until the matching backward (``keep_graph``);
        generate sessions extend their KV cache (``use_cache``). With the flag off, the
        forward is a stateless evaluation through the session's adapter. The body computes on
        its own device in its own dtype; the output comes back on ``hidden``'s, in its dtype.
        """
        self.last_used = time.monotonic()
        caller = (hidden.device, hidden.dtype)
        stateful = keep_graph if self.config.mode == "train" else use_cache
        if offset and not (stateful and self.cache is not None):  # positions past a cache that is not there
            raise SessionError(
                "INVALID_ARGUMENT", f"position offset {offset} without a KV cache; it must be 0"
            )
        hidden, pad_lengths = self.to_body(hidden, pad_lengths)
        self.check_inputs(hidden, pad_lengths, offset if stateful else None)
        self.pool.activate(self.adapter)
        if not stateful:
            with torch.no_grad():
                return _to(self.body(hidden, pad_lengths, None, offset, span=self.config.span), caller)
        if self.config.mode == "generate":
            with torch.no_grad():
                return _to(self.body(hidden, pad_lengths, self.cache, offset, span=self.config.span), caller)
        self._drop_stale()
        if step_id in self.graphs:
            raise SessionError("ALREADY_EXISTS", f"step {step_id} already has a pending forward")
        if len(self.graphs) >= self.max_graphs:
            raise SessionError(
                "RESOURCE_EXHAUSTED", f"{self.max_graphs} forwards await their backward; send backward first"
            )
        inputs = hidden.detach().requires_grad_()
        outputs = self.body(inputs, pad_lengths, None, offset, span=self.config.span)
        self.graphs[step_id] = _Graph(inputs, outputs, self._adapter_versions(), caller=caller)
        return _to(outputs.detach(), caller)

    def _adapter_versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self._adapter_params)

    def backward(self, step_id: int, grad: torch.Tensor) -> torch.Tensor:
        """Backprop the client's gradient w.r.t. the body output; return the gradient w.r.t. the input.

        ``grad`` may come in any dtype and device (it is cast to the output's); the returned
        gradient is on the device and in the dtype of the hidden state the forward was given.
        """
        self.last_used = time.monotonic()
        self._drop_stale()
        graph = self.graphs.pop(step_id, None)
        if graph is None:
            raise SessionError(
                "NOT_FOUND", f"no pending forward for step {step_id} (never sent, already used, or expired)"
            )
        if grad.shape != graph.outputs.shape:
            self.graphs[step_id] = graph
            raise SessionError(
                "INVALID_ARGUMENT", f"grad has shape {list(grad.shape)}, expected {list(graph.outputs.shape)}"
            )
        if graph.versions != self._adapter_versions():
            # Another session sharing this adapter stepped since the forward: autograd would fail
            # half-way (after accumulating part of the gradient into the shared weights).
            raise SessionError(
                "FAILED_PRECONDITION",
                f"the body adapter changed since the forward of step {step_id} (another client's optimiser "
                "step on the shared adapter); send the forward again",
            )
        graph.outputs.backward(grad.to(device=graph.outputs.device, dtype=graph.outputs.dtype))
        return _to(graph.inputs.grad, graph.caller)

    def step(self, clip_norm: float = 0.0, checkpoint: bool = False) -> None:
        """Apply the accumulated body-LoRA gradients (AdamW) and clear them.

        ``checkpoint`` is for the transport: the service saves named runs after the step, and an
        in-process body is saved in the client's own checkpoint.
        """
        if self.config.mode != "train":
            raise SessionError("FAILED_PRECONDITION", "optimizer step on a generate session")
        if self.optimizer is not None:  # None: an empty body span, nothing to train
            if clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.pool.parameters(self.adapter), clip_norm)
            warm_up(self.optimizer, self.config.lr, self.config.warmup_steps)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1  # counted even when empty, so client and server agree on step numbers
        # A forward still waiting for its backward was computed with the weights just changed in
        # place; autograd could not run it any more. Drop it (its backward gets NOT_FOUND).
        self.graphs.clear()

    def _in_span(self, key: str) -> bool:
        parts = key.split(".")
        return (
            len(parts) > 1
            and parts[0] == "layers"
            and self.config.span[0] <= int(parts[1]) < self.config.span[1]
        )

    def adapter_state(self) -> tuple[LoraSettings, dict[str, torch.Tensor]]:
        """The body LoRA of this session's span only (the server may hold more layers)."""
        if self.adapter is None:
            raise SessionError("FAILED_PRECONDITION", "this session has no body adapter")
        state = {k: v for k, v in self.pool.state_dict(self.adapter).items() if self._in_span(k)}
        return self.pool.settings[self.adapter], state

    def put_adapter(self, settings: LoraSettings, state: dict[str, torch.Tensor]) -> None:
        """Load body LoRA weights into this session's adapter (creating a private one if needed)."""
        outside = [k for k in state if not self._in_span(k)]
        if outside:
            raise SessionError(
                "INVALID_ARGUMENT",
                f"adapter weight {outside[0]} is outside the session's body span {list(self.config.span)}",
            )
        if self.adapter is None:
            self.adapter = f"session_{self.id}"
            self.pool.create(self.adapter, settings)
        try:
            self.pool.load_state_dict(self.adapter, state)
        except KeyError as exc:
            raise SessionError("INVALID_ARGUMENT", str(exc)) from None

    def _drop_stale(self) -> None:
        now = time.monotonic()
        for step_id in [s for s, g in self.graphs.items() if now - g.created > self.graph_ttl]:
            del self.graphs[step_id]

    def memory_bytes(self) -> int:
        cache = self.cache.nbytes() if self.cache is not None else 0
        graphs = sum(g.outputs.numel() * g.outputs.element_size() * 8 for g in self.graphs.values())
        return cache + graphs

    def close(self) -> None:
        self.graphs.clear()
        self.cache = None
        if self.adapter and self.adapter.startswith(("session_", "run_")):  # private ones; shared stay
            self.pool.delete(self.adapter)
