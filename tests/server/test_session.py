"""What a BodySession carries, declared where it is made."""

import pytest
import torch

from fedsplit.model.split import load_part
from fedsplit.server.adapters import AdapterPool
from fedsplit.server.config import ServerConfig
from fedsplit.server.session import BodySession, SessionError
from fedsplit.wire.protocol import SessionConfig


def _session(mode="train") -> BodySession:
    body = load_part("tiny-llama", "body", span=(0, 4))
    config = SessionConfig(span=(1, 3), mode=mode, max_length=8, max_batch=1)
    return BodySession(body, AdapterPool(body), config)


def test_a_new_session_declares_every_attribute_the_service_and_checkpoints_set():
    session = _session()
    state = vars(session)
    for name in ("attached", "resumed", "wire_dtype", "saved_step", "run_id", "steps", "optimizer"):
        assert name in state, name
    assert (session.attached, session.resumed, session.saved_step, session.steps) == (False, False, None, 0)


def test_a_session_waits_for_a_backward_as_long_as_the_server_default():
    session = _session()
    assert session.graph_ttl == ServerConfig().graph_ttl == 300.0
    assert session.max_graphs == ServerConfig().max_graphs


def test_check_inputs_refuses_a_batch_larger_than_the_session_allows():
    session = _session(mode="generate")
    hidden, pad = torch.zeros(2, 3, 64), torch.zeros(2, dtype=torch.long)
    with pytest.raises(SessionError, match="exceeds the session's max_batch 1") as caught:
        session.check_inputs(hidden, pad, 0)
    assert caught.value.code == "INVALID_ARGUMENT"
    session.check_inputs(hidden, pad, None)  # stateless: only the shapes count
