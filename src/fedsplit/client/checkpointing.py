"""Client checkpoints and a training loop that resumes after a crash or a server restart.

Every K optimiser steps the client writes, atomically (:mod:`fedsplit.model.store`),
its head/tail LoRA and defence parameters, the AdamW state, torch's RNG state and the
step (= the number of batches consumed, which fixes the data position), and asks the
server to checkpoint the body adapter at the same step (``OptimizerStep.checkpoint``).
On a restart — of either side — the client re-opens its run (``OpenSession.run_id``)
listing the steps it holds; the server picks the latest step both hold
(``SessionOpened.step``) and both continue from there, losing at most K steps.

With the body in this process (``--local``) the client checkpoint holds the body adapter
and its optimiser too.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import torch

from ..model.store import (
    CheckpointError,
    load_optimizer_state,
    optimizer_state,
    prune,
    read_checkpoint,
    valid_steps,
    write_checkpoint,
    write_json_atomic,
)
from ..wire.protocol import SessionConfig
from .core import SplitClient, StepResult
from .remote import RemoteError, ServerUnreachable
from .resilience import Backoff, _quiet_close, is_recoverable

log = logging.getLogger(__name__)

RUN_FILE = "run.json"


def trainable_named(client: SplitClient) -> list[tuple[str, torch.nn.Parameter]]:
    """The client's trainable parameters with names, in :meth:`SplitClient.trainable_parameters` order."""
    named = [
        (f"{part}.{n}", p)
        for part, m in (("head", client.head), ("tail", client.tail))
        for n, p in m.named_parameters()
        if p.requires_grad
    ]
    if client.defense is not None:
        named += [(f"defense.{n}", p) for n, p in client.defense.named_parameters() if p.requires_grad]
    return named


class ClientCheckpointer:
    """Checkpoints of one client run under ``directory`` (``step-<n>/`` folders), the newest ``keep`` kept."""

    def __init__(self, directory: str | Path, every: int, keep: int = 3) -> None:
        self.directory, self.every, self.keep = Path(directory), every, max(keep, 2)

    def steps(self) -> list[int]:
        return valid_steps(self.directory)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, client: SplitClient, step: int, meta: dict | None = None) -> Path:
        named = trainable_named(client)
        tensors = {f"param.{n}": p.detach() for n, p in named}
        state = {"meta": meta or {}, "optimizer": None, "body": None}
        if client.optimizer is not None:
            opt_tensors, state["optimizer"] = optimizer_state(client.optimizer, [n for n, _ in named])
            tensors |= opt_tensors
        if client.defense is not None:
            tensors |= {
                f"defense_state.{k}": v
                for k, v in client.defense.state_dict().items()
                if isinstance(v, torch.Tensor)
            }
        tensors["rng.torch"] = torch.get_rng_state()
        if client.device.type == "cuda":  # noise drawn on the GPU comes from its own generator
            tensors["rng.cuda"] = torch.cuda.get_rng_state(client.device)
        body = client.train_session
        if hasattr(body, "pool") and getattr(body, "optimizer", None) is not None:  # body in this process
            adapter = body.pool.state_dict(body.adapter)
            tensors |= {f"body.{k}": v for k, v in adapter.items()}
            body_tensors, state["body"] = optimizer_state(body.optimizer, list(adapter), prefix="body_optim.")
            tensors |= body_tensors
        # Written from the CPU whatever device the segments are on; load() copies them back there.
        tensors = {k: v.detach().cpu() for k, v in tensors.items()}
        path = write_checkpoint(self.directory, step, tensors, state)
        prune(self.directory, self.keep)
        return path

    def load(self, client: SplitClient, step: int) -> dict:
        """Restore the client (and a local body) to ``step``; returns the saved meta."""
        tensors, state = read_checkpoint(self.directory, step)
        named = trainable_named(client)
        missing = [n for n, _ in named if f"param.{n}" not in tensors]
        if missing:
            raise CheckpointError(
                f"checkpoint {self.directory} at step {step} lacks {missing[:3]}: "
                "was it written with other head/tail/LoRA settings?"
            )
        with torch.no_grad():
            for n, p in named:
                p.copy_(tensors[f"param.{n}"])
                p.grad = None  # a step that failed half-way may have left gradients behind
        if client.optimizer is not None and state.get("optimizer"):
            load_optimizer_state(client.optimizer, [n for n, _ in named], tensors, state["optimizer"])
        if client.defense is not None:
            extra = {
                k[len("defense_state.") :]: v for k, v in tensors.items() if k.startswith("defense_state.")
            }
            if extra:
                client.defense.load_state_dict(extra, strict=False)
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and client.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], client.device)
        body = client.train_session
        if state.get("body") and hasattr(body, "pool"):
            adapter = {k[len("body.") :]: v for k, v in tensors.items() if k.startswith("body.")}
            body.pool.load_state_dict(body.adapter, adapter)
            names = list(body.pool.state_dict(body.adapter))  # the optimizer's order, not the file's
            load_optimizer_state(body.optimizer, names, tensors, state["body"], prefix="body_optim.")
        if hasattr(body, "pool"):
            body.steps = step
        prune(self.directory, self.keep, above=step)
        return state.get("meta", {})


def run_id_for(out: str | Path, resume: bool, run_id: str | None = None) -> str:
    """The run id stored in ``out/run.json``; a new one (or ``run_id``) unless resuming."""
    path = Path(out) / RUN_FILE
    if resume:
        if not path.is_file():
            raise FileNotFoundError(f"nothing to resume in {out}: no {RUN_FILE} (start without --resume)")
        import json

        return json.loads(path.read_text())["run_id"]
    run_id = run_id or uuid.uuid4().hex[:16]
    write_json_atomic(path, {"run_id": run_id})
    return run_id


class ResilientTrainer:
    """Split training steps that checkpoint every K steps and survive restarts of either side.

    ``batches`` makes a fresh, deterministic batch iterator; after a resume at step ``s``
    its first ``s`` batches are skipped, so the data order is that of an uninterrupted run.
    """

    def __init__(
        self,
        client: SplitClient,
        config: SessionConfig,
        batches: Callable[[], Iterator[dict]],
        checkpointer: ClientCheckpointer,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        clip_norm: float = 0.0,
        reconnect_timeout: float = 300.0,
        max_recoveries: int = 20,
    ) -> None:
        self.client, self.config, self.make_batches = client, config, batches
        self.checkpointer, self.lr, self.weight_decay, self.clip_norm = (
            checkpointer,
            lr,
            weight_decay,
            clip_norm,
        )
        self.reconnect_timeout, self.max_recoveries = reconnect_timeout, max_recoveries
        self.step = 0
        self.recoveries = 0
        self._batches: Iterator[dict] | None = None
        self._warned = False

    # ------------------------------------------------------------------ (re)start

    def start(self, resume: bool = False) -> int:
        """Open the run and restore the latest common step (resume) or start at 0; returns the step."""
        if not resume:
            self.client.start_training(replace(self.config, resume_steps=(0,)), self.lr, self.weight_decay)
            self.checkpointer.save(self.client, 0, {"run_id": self.config.run_id})
            return self._at(0)
        return self._open_common()

    def _open_common(self) -> int:
        steps = self.checkpointer.steps()
        if not steps:
            raise CheckpointError(
                f"no usable checkpoint in {self.checkpointer.directory}; start without --resume"
            )
        # Never fall back to step 0 silently when we hold later steps: a server that lost the run
        # answers FAILED_PRECONDITION and the user decides.
        offer = tuple(s for s in steps if s > 0) or (0,)
        if self.client.train_session is not None:
            _quiet_close(self.client.train_session)
        self.client.start_training(replace(self.config, resume_steps=offer), self.lr, self.weight_decay)
        session = self.client.train_session
        step = getattr(session, "opened_step", None)
        if step is None:  # the body is in this process: it comes back from our own checkpoint
            step = max(steps)
        if step not in offer:
            raise CheckpointError(
                f"the server resumed run {self.config.run_id} at step {step}, "
                f"which this client has no checkpoint of ({steps})"
            )
        self.checkpointer.load(self.client, step)
        log.info("run %s resumes at step %d", self.config.run_id, step)
        return self._at(step)

    def _at(self, step: int) -> int:
        self.step = step
        self._batches = self.make_batches()
        for _ in range(step):  # the data position is the step: one batch per step
            next(self._batches)
        return step

    def _recover(self, cause: BaseException) -> None:
        self.recoveries += 1
        if self.recoveries > self.max_recoveries:
            raise ServerUnreachable(f"gave up after {self.max_recoveries} recoveries; last error: {cause}")
        backoff = Backoff(self.reconnect_timeout, first=0.5)
        while True:
            try:
                self._open_common()
                return
            except Exception as exc:
                # "in use": the server has not yet noticed that our previous stream broke
                in_use = isinstance(exc, RemoteError) and "in use" in exc.message
                if not (is_recoverable(exc) or in_use):
                    raise
                if not backoff.wait():
                    raise ServerUnreachable(
                        f"the server did not come back within {self.reconnect_timeout:.0f}s "
                        f"({exc}); rerun with --resume when it is up"
                    ) from None

    # ------------------------------------------------------------------ steps

    def train_step(self) -> StepResult:
        """One optimiser step (retried from the last common checkpoint if the server goes away)."""
        while True:
            batch = next(self._batches)
            due = self.checkpointer.due(self.step + 1)
            try:
                result = self.client.train_step(batch, self.clip_norm, checkpoint=due)
            except Exception as exc:
                if not is_recoverable(exc):
                    raise
                log.warning(
                    "step %d failed (%s); resuming from the last common checkpoint", self.step + 1, exc
                )
                self._recover(exc)
                continue
            self.step += 1
            if due:
                self._checkpoint()
            return result

    def _checkpoint(self) -> None:
        stats = getattr(self.client.train_session, "last_stats", None)
        if stats is not None and not stats.get("checkpointed") and not self._warned:
            log.warning(
                "the server keeps no checkpoints (start it with --checkpoint-dir); a server restart "
                "will lose the body adapter"
            )
            self._warned = True
        self.checkpointer.save(self.client, self.step, {"run_id": self.config.run_id})

    def run(self, steps: int, on_step: Callable[[int, StepResult], None] | None = None) -> None:
        while self.step < steps:
            result = self.train_step()
            if on_step is not None:
                on_step(self.step, result)
