"""In-process servicers on the tiny model: the coordinators' real code, without sockets."""

import pytest

from fedsplit.model.split import load_part
from fedsplit.server.config import ServerConfig
from fedsplit.server.service import SplitServicer


@pytest.fixture
def make_servicer():
    """``make_servicer(mode, **server_config)`` -> a SplitServicer holding all 4 tiny-llama layers."""
    made = []

    def make(mode: str, **options) -> SplitServicer:
        body = load_part("tiny-llama", "body", span=(0, 4))
        servicer = SplitServicer(body, ServerConfig(model="tiny-llama", mode=mode, **options), "test")
        made.append(servicer)
        return servicer

    yield make
    for servicer in made:
        servicer.executor.shutdown(wait=True)
