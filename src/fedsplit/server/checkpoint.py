"""Training runs that outlive the server process: body LoRA + AdamW checkpoints per (client, run id).

A TRAIN session opened with ``run_id`` trains the adapter of that run instead of a
private one. With a checkpoint directory (``fedsplit serve --checkpoint-dir DIR
--checkpoint-every K``) the server writes the run's adapter weights and optimiser state
every K optimiser steps, whenever the client asks (``OptimizerStep.checkpoint``), when
the session closes or is evicted, and on SIGTERM. Layout::

    DIR/<client>/<run id>/step-00000010/{tensors.safetensors, state.json}

Writes are atomic (:mod:`fedsplit.model.store`), so a ``kill -9`` never leaves a
checkpoint a restarted server would load half of. A client re-opening the run lists the
steps it holds checkpoints for (``OpenSession.resume_steps``); the server resumes from
the latest step both sides have and reports it in ``SessionOpened.step``.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

from ..model.lora import LoraSettings
from ..model.store import (
    CheckpointError,
    load_optimizer_state,
    optimizer_state,
    prune,
    read_checkpoint,
    valid_steps,
    write_checkpoint,
)
from .session import BodySession, SessionError

log = logging.getLogger(__name__)

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ADAPTER_PREFIX = "adapter."


def check_run_id(run_id: str) -> None:
    """Raise :class:`SessionError` unless ``run_id`` can name a run (it becomes a directory name)."""
    if not _RUN_ID.match(run_id):
        raise SessionError(
            "INVALID_ARGUMENT",
            "run_id must be 1-64 characters of letters, digits, '.', '_' or '-', starting with a letter or digit",
        )


def run_adapter_name(owner: str, run_id: str) -> str:
    """Adapter name of a run inside the body (peft adapter names may not contain dots)."""
    return "run_" + hashlib.sha256(f"{owner}\0{run_id}".encode()).hexdigest()[:16]


def _safe(name: str) -> str:
    return name if _SAFE.match(name) else "x-" + hashlib.sha256(name.encode()).hexdigest()[:16]


class RunCheckpoints:
    """Saves and restores the body adapters of training runs; a no-op without a directory."""

    def __init__(self, root: str | Path | None, every: int = 0, keep: int = 3, fingerprint: str = "") -> None:
        self.root = Path(root) if root else None
        self.every, self.keep, self.fingerprint = every, max(keep, 1), fingerprint
        self.saved = 0

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def run_dir(self, owner: str, run_id: str) -> Path:
        assert self.root is not None
        return self.root / _safe(owner) / _safe(run_id)

    def steps(self, owner: str, run_id: str) -> list[int]:
        return valid_steps(self.run_dir(owner, run_id)) if self.enabled else []

    # ------------------------------------------------------------------ open

    def find_live(self, sessions: Mapping[str, BodySession], owner: str, run_id: str) -> BodySession | None:
        """The session of this run still held in memory (parked after a broken stream, or attached)."""
        for session in sessions.values():
            if session.run_id == run_id and session.owner == owner:
                return session
        return None

    def restore(self, session: BodySession, resume_steps: list[int]) -> int:
        """Load the run's checkpoint at the latest step in ``resume_steps`` we also have (empty: our latest).

        Step 0 is always available: the adapter as freshly (seed-)initialised. Checkpoints after the
        chosen step are deleted — they belong to a timeline the client abandoned. Returns the step.
        """
        owner, run_id = session.owner, session.run_id
        have = set(self.steps(owner, run_id)) | {0}
        candidates = have & set(resume_steps) if resume_steps else have
        if not candidates:
            raise SessionError(
                "FAILED_PRECONDITION",
                f"run {run_id!r}: no step in common — the client holds checkpoints for {sorted(resume_steps)}, "
                f"the server for {sorted(have)}; resume the client from one of the server's steps or start over "
                "(include step 0)",
            )
        step = max(candidates)
        if step > 0:
            tensors, meta = read_checkpoint(self.run_dir(owner, run_id), step)
            self._load(session, tensors, meta)
        session.steps = step
        session.saved_step = step
        session.resumed = step > 0
        if self.enabled:
            prune(self.run_dir(owner, run_id), self.keep, above=step)
        log.info("run %s of %s starts at step %d", run_id, owner, step)
        return step

    def _load(self, session: BodySession, tensors: dict, meta: dict) -> None:
        settings = session.pool.settings[session.adapter]
        saved = meta.get("lora", {})
        if meta.get("fingerprint") and self.fingerprint and meta["fingerprint"] != self.fingerprint:
            raise SessionError(
                "FAILED_PRECONDITION", f"run {session.run_id!r} was trained on a different model"
            )
        if list(meta.get("span", [])) != list(session.config.span):
            raise SessionError(
                "FAILED_PRECONDITION",
                f"run {session.run_id!r} was trained on body span {meta.get('span')}, not {list(session.config.span)}",
            )
        if (saved.get("rank"), saved.get("alpha"), tuple(saved.get("targets", ()))) != (
            settings.rank,
            settings.alpha,
            tuple(settings.targets),
        ):
            raise SessionError(
                "FAILED_PRECONDITION",
                f"run {session.run_id!r} was trained with LoRA {saved}, not {asdict(settings)}",
            )
        state = {k[len(ADAPTER_PREFIX) :]: v for k, v in tensors.items() if k.startswith(ADAPTER_PREFIX)}
        try:
            session.pool.load_state_dict(session.adapter, state)
            if session.optimizer is not None and meta.get("optimizer"):
                names = list(session.pool.state_dict(session.adapter))
                load_optimizer_state(session.optimizer, names, tensors, meta["optimizer"])
        except (KeyError, CheckpointError, ValueError, RuntimeError) as exc:
            raise SessionError(
                "FAILED_PRECONDITION", f"run {session.run_id!r}: cannot load checkpoint: {exc}"
            ) from None

    # ------------------------------------------------------------------ save

    def save(self, session: BodySession) -> bool:
        """Write the run's adapter + optimiser at its current step. Never raises: a failed save is logged."""
        if not self.enabled or session.run_id is None:
            return False
        try:
            settings: LoraSettings = session.pool.settings[session.adapter]
            adapter = session.pool.state_dict(session.adapter)
            opt_tensors, opt_meta = (
                optimizer_state(session.optimizer, list(adapter)) if session.optimizer else ({}, None)
            )
            tensors = {ADAPTER_PREFIX + k: v for k, v in adapter.items()} | opt_tensors
            meta = {
                "kind": "fedsplit-body-run",
                "owner": session.owner,
                "run_id": session.run_id,
                "span": list(session.config.span),
                "fingerprint": self.fingerprint,
                "lora": {**asdict(settings), "targets": list(settings.targets)},
                "optimizer": opt_meta,
            }
            directory = self.run_dir(session.owner, session.run_id)
            write_checkpoint(directory, session.steps, tensors, meta)
            prune(directory, self.keep)
        except Exception:  # a full disk must not take the session down; the client sees checkpointed=0
            log.exception("checkpoint of run %s failed", session.run_id)
            return False
        session.saved_step = session.steps
        self.saved += 1
        log.info("checkpointed run %s of %s at step %d", session.run_id, session.owner, session.steps)
        return True

    def after_step(self, session: BodySession, requested: bool) -> bool:
        """Called after each optimiser step: save every K steps, or when the client asks."""
        if session.run_id is None:
            return False
        due = self.every > 0 and session.steps % self.every == 0
        return self.save(session) if (requested or due) else False

    def save_if_dirty(self, session: BodySession) -> bool:
        """Save a run whose latest step is not on disk yet (on close, eviction and SIGTERM)."""
        saved = session.saved_step  # None: the run never finished opening
        if session.run_id is None or saved is None or saved == session.steps:
            return False
        return self.save(session)

    def save_all(self, sessions: list[BodySession]) -> int:
        """Save every run among ``sessions`` whose latest step is not on disk; how many were saved."""
        return sum(self.save_if_dirty(s) for s in sessions)
