import pytest

from fedsplit.model.loading import model_fingerprint
from fedsplit.server.auth import add_token
from fedsplit.server.config import ServerConfig
from fedsplit.server.runner import build_servicer, start_background


@pytest.fixture
def server():
    """A tiny-llama server holding all 4 layers on a free loopback port, stopped after the test."""
    srv = start_background(
        build_servicer(ServerConfig(model="tiny-llama", port=0, host="127.0.0.1", shutdown_grace=0.2))
    )
    yield srv
    srv.stop()


@pytest.fixture
def auth_server(tmp_path):
    tokens = tmp_path / "tokens"
    alice, bob = add_token(tokens, "alice"), add_token(tokens, "bob")
    srv = start_background(
        build_servicer(ServerConfig(model="tiny-llama", port=0, shutdown_grace=0.2), tokens_file=str(tokens))
    )
    yield srv, {"alice": alice, "bob": bob}
    srv.stop()


@pytest.fixture
def fingerprint():
    return model_fingerprint("tiny-llama")
