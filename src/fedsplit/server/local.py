"""The public way to run body sessions in the client's own process (``--local``, tests).

The client's :class:`~fedsplit.client.core.LocalTransport` reaches the server package only
through these two factories, so an in-process body runs exactly the code the service runs.
"""

from __future__ import annotations

from ..model.segments import Body
from ..wire.protocol import SessionConfig
from .adapters import AdapterPool
from .session import BodySession


def adapter_pool(body: Body) -> AdapterPool:
    """The adapters (peft named adapters on the shared frozen layers) of an in-process body."""
    return AdapterPool(body)


def open_session(body: Body, pool: AdapterPool, config: SessionConfig) -> BodySession:
    """A body session as the server would open it, without the network."""
    return BodySession(body, pool, config)
