"""The audit log of ``serve --audit-log FILE``: one JSON object per line, never any content.

Events (``event``):

- ``open``: a stream attached a session (new, or ``resumed``): client, session, mode, span,
  max_length, max_batch, run_id.
- ``close``: that stream ended: the same ids plus ``duration_s``, ``requests``, ``errors`` (requests
  answered with an Error), ``tokens`` (positions sent through the body: rows x sequence length),
  ``decode_tokens`` (rows of one-position cached forwards), ``forwards``, ``backwards``, ``steps``
  (optimiser steps), ``bytes_in``/``bytes_out`` (serialized messages) and ``status``: ``ok`` (the
  client sent Close), ``parked`` (the stream broke; the session waits for a resume) or the gRPC
  status name that ended it (``UNAUTHENTICATED`` after a revocation, ``INTERNAL``, ...).
- ``refused``: an authenticated client's stream ended before a session opened (``status``, ``reason``).
- ``evicted``: a parked session was freed (``reason``: ``ttl`` or ``revoked``).

Every line has ``time`` (UTC, ISO 8601). Only counts, sizes, ids and status names are written:
no tensors, no prompts, no tokens' values.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class AuditLog:
    """Appends JSON lines to a file created ``0600``; each line is flushed when written."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, event: str, **fields: Any) -> None:
        """One line: ``{"time": ..., "event": event, **fields}``."""
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
        line = json.dumps({"time": now, "event": event, **fields}, separators=(",", ":"))
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


@dataclass
class StreamRecord:
    """What one session stream did, counted as it goes; :meth:`fields` is its audit record."""

    client: str
    started: float = field(default_factory=time.monotonic)
    session: dict[str, Any] = field(default_factory=dict)  # ids of the attached session (see ``attach``)
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    decode_tokens: int = 0
    forwards: int = 0
    backwards: int = 0
    steps: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    def attach(self, session_id: str, config, resumed: bool) -> None:
        """Note the session this stream carries (``config``: its SessionConfig)."""
        self.session = {
            "session": session_id,
            "mode": config.mode,
            "span": list(config.span),
            "max_length": config.max_length,
            "max_batch": config.max_batch,
            "run_id": config.run_id,
            "resumed": resumed,
        }

    def count(self, kind: str, msg, reply) -> None:
        """Count one request (a ClientMessage of ``kind``) and its reply (a ServerMessage)."""
        self.requests += 1
        self.bytes_in += msg.ByteSize()
        self.bytes_out += reply.ByteSize()
        if reply.WhichOneof("kind") == "error":
            self.errors += 1
            return
        if kind == "forward":
            self.forwards += 1
            shape = list(msg.forward.hidden.shape)
            if len(shape) == 3:
                self.tokens += shape[0] * shape[1]
                if shape[1] == 1 and msg.forward.use_cache:
                    self.decode_tokens += shape[0]
        elif kind == "backward":
            self.backwards += 1
        elif kind == "step":
            self.steps += 1

    def fields(self, status: str) -> dict[str, Any]:
        """The ``close`` record of this stream, ending with ``status``."""
        return {
            "client": self.client,
            **self.session,
            "duration_s": round(time.monotonic() - self.started, 3),
            "requests": self.requests,
            "errors": self.errors,
            "tokens": self.tokens,
            "decode_tokens": self.decode_tokens,
            "forwards": self.forwards,
            "backwards": self.backwards,
            "steps": self.steps,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "status": status,
        }
