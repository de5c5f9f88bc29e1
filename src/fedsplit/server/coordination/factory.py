"""The coordinator of a server's training mode."""

from __future__ import annotations

from .base import BodyHost, Coordinator, check_mode
from .client_batch import ClientBatch
from .hierarchical import ServerHierarchical
from .sequential import Sequential

_BY_MODE: dict[str, type[Coordinator]] = {
    "independent": Coordinator,
    "sequential": Sequential,
    "client-batch": ClientBatch,
    "server-hierarchical": ServerHierarchical,
}


def make_coordinator(host: BodyHost) -> Coordinator:
    """The coordinator for ``host.config.mode`` (a ValueError names the valid modes)."""
    return _BY_MODE[check_mode(host.config.mode)](host)
