"""Named training runs on the server: checkpointed every K steps, on close, eviction and shutdown; resumed
from the latest step client and server both hold."""

import grpc
import pytest
import torch
from faultkit import wait_until

from fedsplit.client.remote import RemoteError, RemoteTransport
from fedsplit.model.lora import LoraSettings
from fedsplit.model.store import checkpoint_steps
from fedsplit.server.auth import add_token
from fedsplit.server.config import ServerConfig
from fedsplit.server.runner import build_servicer, start_background
from fedsplit.wire.protocol import SessionConfig

LORA = LoraSettings(rank=2, alpha=4.0)


def start(tmp_path, port=0, **kw):
    tokens = tmp_path / "tokens"
    if not tokens.exists():
        for name in ("alice", "bob"):
            (tmp_path / f"{name}.token").write_text(add_token(tokens, name))
    config = ServerConfig(
        model="tiny-llama",
        port=port,
        checkpoint_dir=str(tmp_path / "runs"),
        checkpoint_every=2,
        **{"shutdown_grace": 0.2, **kw},
    )
    return start_background(build_servicer(config, tokens_file=str(tokens)))


def open_run(srv, tmp_path, who="alice", run_id="r", resume_steps=()):
    token = (tmp_path / f"{who}.token").read_text()
    transport = RemoteTransport(
        srv.address, token=token, wire_dtype="fp32", fingerprint=srv.servicer.fingerprint, retries=0
    )
    return transport.open(
        SessionConfig(
            span=(1, 3),
            mode="train",
            lora=LORA,
            seed=7,
            lr=1e-2,
            max_length=8,
            max_batch=1,
            run_id=run_id,
            resume_steps=tuple(resume_steps),
        )
    )


def train(session, steps, first=1):
    for step in range(first, first + steps):
        hidden = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(step))
        out = session.forward(step, hidden, torch.zeros(1, dtype=torch.long))
        session.backward(step, out.detach().clone())
        session.step()


def run_dir(tmp_path, who="alice", run_id="r"):
    return tmp_path / "runs" / who / run_id


def test_run_checkpoints_every_k_and_on_close(tmp_path):
    with start(tmp_path) as srv:
        session = open_run(srv, tmp_path)
        assert session.opened_step == 0 and not session.resumed
        train(session, 5)
        assert session.last_stats == {"step": 5.0, "checkpointed": 0.0}
        session.close()
        assert wait_until(lambda: checkpoint_steps(run_dir(tmp_path)) == [2, 4, 5], timeout=10)


def test_reopened_run_continues_from_latest_common_step(tmp_path):
    with start(tmp_path) as srv:
        first = open_run(srv, tmp_path)
        train(first, 4)
        state_at_4 = first.adapter_state()[1]
        train(first, 1, first=5)
        first.close()
        assert wait_until(lambda: checkpoint_steps(run_dir(tmp_path)) == [2, 4, 5], timeout=10)
        again = open_run(srv, tmp_path, resume_steps=[2, 4])  # the client lost step 5
        assert again.opened_step == 4 and again.resumed
        restored = again.adapter_state()[1]
        assert all(torch.equal(restored[k], v) for k, v in state_at_4.items())
        assert checkpoint_steps(run_dir(tmp_path)) == [2, 4]  # step 5 was on an abandoned timeline
        again.close()


def test_no_common_step_is_refused(tmp_path):
    with start(tmp_path) as srv:
        session = open_run(srv, tmp_path)
        train(session, 2)
        session.close()
        wait_until(lambda: checkpoint_steps(run_dir(tmp_path)) == [2], timeout=10)
        with pytest.raises(RemoteError) as exc:
            open_run(srv, tmp_path, resume_steps=[3])
        assert (
            exc.value.code == grpc.StatusCode.FAILED_PRECONDITION and "no step in common" in exc.value.message
        )


def test_runs_belong_to_their_client(tmp_path):
    with start(tmp_path) as srv:
        alice = open_run(srv, tmp_path)
        train(alice, 2)
        alice.close()
        bob = open_run(srv, tmp_path, who="bob")  # same run id, other client: a different run
        assert bob.opened_step == 0
        bob.close()


def test_a_run_in_use_cannot_be_opened_twice(tmp_path):
    with start(tmp_path) as srv:
        session = open_run(srv, tmp_path)
        with pytest.raises(RemoteError) as exc:
            open_run(srv, tmp_path)
        assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION
        session.close()


def test_parked_run_is_reattached_at_its_live_step(tmp_path):
    with start(tmp_path) as srv:
        session = open_run(srv, tmp_path)
        train(session, 3)
        session._outbox.put(None)  # the stream breaks without Close: the server parks the session
        for _ in session._call:
            pass
        again = open_run(srv, tmp_path, resume_steps=[2, 3])
        assert again.id == session.id and again.opened_step == 3 and again.resumed
        again.close()


def test_shutdown_checkpoints_live_runs_and_a_restart_restores_them(tmp_path):
    srv = start(tmp_path)
    port = srv.port
    session = open_run(srv, tmp_path)
    train(session, 3)
    state = session.adapter_state()[1]
    srv.stop()  # what SIGTERM does
    assert checkpoint_steps(run_dir(tmp_path)) == [2, 3]
    with start(tmp_path, port=port) as again:
        resumed = open_run(again, tmp_path, resume_steps=[3])
        assert resumed.opened_step == 3
        restored = resumed.adapter_state()[1]
        assert all(torch.equal(restored[k], v) for k, v in state.items())
        resumed.close()


def test_evicted_run_is_checkpointed_then_freed(tmp_path):
    with start(tmp_path, session_ttl=0.5) as srv:
        session = open_run(srv, tmp_path)
        train(session, 3)
        session._outbox.put(None)
        for _ in session._call:
            pass
        assert wait_until(lambda: not srv.servicer.sessions, timeout=10)
        assert wait_until(lambda: checkpoint_steps(run_dir(tmp_path)) == [2, 3], timeout=10)
        assert wait_until(lambda: not srv.servicer.pool.settings, timeout=10)  # the run's adapter is freed


def test_run_id_is_validated(tmp_path):
    with start(tmp_path) as srv:
        for bad in ("../x", ".hidden", "a" * 65, "sp ace"):
            with pytest.raises(RemoteError) as exc:
                open_run(srv, tmp_path, run_id=bad)
            assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
