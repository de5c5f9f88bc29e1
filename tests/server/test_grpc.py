"""The body over loopback gRPC: exactness, concurrency, auth and bad input."""

import copy
import threading

import grpc
import pytest
import torch

from fedsplit.client.core import LocalTransport, SplitClient
from fedsplit.client.remote import RemoteError, RemoteTransport
from fedsplit.model.lora import LoraSettings, add_lora
from fedsplit.model.split import load_part
from fedsplit.wire.protocol import SessionConfig

SPEC = "tiny-llama"
LORA = LoraSettings(rank=4, alpha=8.0)


def make_client(address, p, q, fingerprint, wire_dtype="fp32", token=None, lora=False):
    head, tail = load_part(SPEC, "head", p, q), load_part(SPEC, "tail", p, q)
    if lora:
        torch.manual_seed(5)
        add_lora(head, LORA)
        add_lora(tail, LORA)
    transport = RemoteTransport(
        address, token=token, wire_dtype=wire_dtype, fingerprint=fingerprint, retries=0
    )
    return SplitClient(head, tail, transport, (p, 4 - q))


def batch():
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(10, 250, (2, 9), generator=gen)
    pad = torch.tensor([0, 4])
    labels = ids.masked_fill(torch.arange(9)[None] <= pad[:, None], -100)
    return {"input_ids": ids, "labels": labels, "pad_lengths": pad}


def test_generation_over_grpc_equals_unsplit_model(server, fingerprint, tiny):
    model, _ = tiny
    model.generation_config.eos_token_id = None
    b = batch()
    mask = (torch.arange(9)[None] >= b["pad_lengths"][:, None]).long()
    expected = model.generate(
        b["input_ids"], attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0
    )
    client = make_client(server.address, 1, 1, fingerprint)
    got = client.generate(b["input_ids"], b["pad_lengths"], max_new_tokens=12)
    assert torch.equal(got, expected[:, 9:])


def test_train_step_over_grpc_gives_in_process_gradients(server, fingerprint):
    remote = make_client(server.address, 1, 1, fingerprint, lora=True)
    local_body = load_part(SPEC, "body", 1, 1)
    local = SplitClient(
        copy.deepcopy(remote.head), copy.deepcopy(remote.tail), LocalTransport(local_body), (1, 3)
    )
    config = SessionConfig(span=(1, 3), mode="train", lora=LORA, max_batch=2, max_length=64)
    torch.manual_seed(11)
    remote.start_training(config)
    torch.manual_seed(11)  # the body adapter is initialised from the same seed on both sides
    local.start_training(config)
    loss_r, _ = remote.loss_and_backward(batch())
    loss_l, _ = local.loss_and_backward(batch())
    assert torch.allclose(loss_r, loss_l, rtol=1e-6)
    for (name, p_r), p_l in zip(remote.head.named_parameters(), local.head.parameters()):
        if p_r.requires_grad:
            rel = (p_r.grad - p_l.grad).norm() / p_l.grad.norm().clamp_min(1e-12)
            assert rel <= 1e-5, name
    # and the step runs on the server
    remote.optimizer_step()


def test_body_lr_warmup_travels_with_the_session_and_ramps_the_servers_lr(server, fingerprint):
    client = make_client(server.address, 1, 1, fingerprint, lora=True)
    config = SessionConfig(
        span=(1, 3), mode="train", lora=LORA, lr=0.03, warmup_steps=3, max_batch=2, max_length=64
    )
    client.start_training(config)
    session = next(iter(server.servicer.sessions.values()))
    assert session.config.warmup_steps == 3
    seen = []
    for _ in range(4):
        client.train_step(batch())
        seen.append(session.optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([0.01, 0.02, 0.03, 0.03])


def test_two_clients_with_different_partitions_work_at_once(server, fingerprint):
    errors, results = [], {}

    def work(name, p, q):
        try:
            client = make_client(server.address, p, q, fingerprint, lora=True)
            client.start_training(
                SessionConfig(span=(p, 4 - q), mode="train", lora=LORA, max_batch=2, max_length=64)
            )
            losses = [client.train_step(batch()).loss for _ in range(3)]
            results[name] = (losses, client.generate(batch()["input_ids"], batch()["pad_lengths"], 5))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=work, args=("a", 1, 1)),
        threading.Thread(target=work, args=("b", 2, 0)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for losses, tokens in results.values():
        assert losses[-1] < losses[0]  # each client's own training makes progress
        assert tokens.shape == (2, 5)


def test_missing_or_wrong_token_is_unauthenticated(auth_server, fingerprint):
    srv, tokens = auth_server
    for token in (None, "not-a-token"):
        client = make_client(srv.address, 1, 1, fingerprint, token=token)
        with pytest.raises(RemoteError) as exc:
            client.generate(batch()["input_ids"], batch()["pad_lengths"], 2)
        assert exc.value.code == grpc.StatusCode.UNAUTHENTICATED
    ok = make_client(srv.address, 1, 1, fingerprint, token=tokens["alice"])
    assert ok.generate(batch()["input_ids"], batch()["pad_lengths"], 2).shape == (2, 2)


def test_another_clients_session_id_is_refused(auth_server, fingerprint):
    srv, tokens = auth_server
    alice = RemoteTransport(srv.address, token=tokens["alice"], fingerprint=fingerprint, retries=0)
    bob = RemoteTransport(srv.address, token=tokens["bob"], fingerprint=fingerprint, retries=0)
    config = SessionConfig(span=(1, 3), mode="generate", max_length=32)
    session = alice.open(config)
    session._outbox.put(None)  # drop the stream without Close: the server parks the session
    for _ in session._call:
        pass
    with pytest.raises(RemoteError) as exc:
        bob.open(config, resume=session.id)
    assert exc.value.code == grpc.StatusCode.PERMISSION_DENIED
    resumed = alice.open(config, resume=session.id)  # the owner may re-attach
    assert resumed.id == session.id


def open_generate(server, fingerprint, span=(1, 3), **kw):
    transport = RemoteTransport(server.address, wire_dtype="fp32", fingerprint=fingerprint, retries=0, **kw)
    return transport.open(SessionConfig(span=span, mode="generate", max_length=32, max_batch=2))


@pytest.mark.parametrize(
    "hidden, code",
    [
        (torch.zeros(1, 3, 65), grpc.StatusCode.INVALID_ARGUMENT),  # wrong hidden size
        (torch.full((1, 3, 64), float("nan")), grpc.StatusCode.INVALID_ARGUMENT),
        (torch.zeros(1, 40, 64), grpc.StatusCode.OUT_OF_RANGE),  # beyond max_length
        (torch.zeros(3, 2, 64), grpc.StatusCode.INVALID_ARGUMENT),  # rows != pad lengths
    ],
)
def test_malformed_forward_gets_status_and_session_keeps_working(server, fingerprint, hidden, code):
    session = open_generate(server, fingerprint)
    with pytest.raises(RemoteError) as exc:
        session.forward(1, hidden, torch.zeros(1, dtype=torch.long))
    assert exc.value.code == code
    good = session.forward(2, torch.randn(1, 3, 64), torch.zeros(1, dtype=torch.long))
    assert good.shape == (1, 3, 64) and torch.isfinite(good).all()
    session.close()


def test_span_outside_held_layers_is_out_of_range(server, fingerprint):
    with pytest.raises(RemoteError) as exc:
        open_generate(server, fingerprint, span=(1, 9))
    assert exc.value.code == grpc.StatusCode.OUT_OF_RANGE


def test_model_mismatch_detected_at_open(server):
    with pytest.raises(RemoteError) as exc:
        open_generate(server, "0123456789abcdef")
    assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "model mismatch" in exc.value.message


def test_backward_for_unknown_step_is_not_found(server, fingerprint):
    transport = RemoteTransport(server.address, wire_dtype="fp32", fingerprint=fingerprint, retries=0)
    session = transport.open(SessionConfig(span=(1, 3), mode="train", lora=LORA, max_length=16))
    with pytest.raises(RemoteError) as exc:
        session.backward(99, torch.zeros(1, 2, 64))
    assert exc.value.code == grpc.StatusCode.NOT_FOUND


def test_admission_refuses_sessions_beyond_memory_budget(fingerprint):
    from fedsplit.server.config import ServerConfig
    from fedsplit.server.runner import build_servicer, start_background

    config = ServerConfig(model=SPEC, port=0, memory_budget=1_000_000)
    with start_background(build_servicer(config)) as srv:
        transport = RemoteTransport(srv.address, fingerprint=fingerprint, retries=0)
        small = transport.open(SessionConfig(span=(1, 3), mode="generate", max_length=64))
        with pytest.raises(RemoteError) as exc:
            transport.open(SessionConfig(span=(1, 3), mode="generate", max_length=100_000))
        assert exc.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        small.close()


def test_unreachable_server_gives_clear_error(fingerprint):
    from fedsplit.client.remote import ServerUnreachable

    transport = RemoteTransport("127.0.0.1:1", fingerprint=fingerprint, retries=1, backoff=0.01)
    with pytest.raises(ServerUnreachable, match="fedsplit serve"):
        transport.open(SessionConfig(span=(1, 3), mode="generate", max_length=8))


def test_body_adapter_of_a_session_covers_only_its_span(server, fingerprint):
    transport = RemoteTransport(server.address, wire_dtype="fp32", fingerprint=fingerprint, retries=0)
    session = transport.open(SessionConfig(span=(1, 3), mode="train", lora=LORA, max_length=16))
    settings, state = session.adapter_state()
    layers = {int(k.split(".")[1]) for k in state}
    assert layers == {1, 2}  # the server holds 0..3, the session trains 1..2
    other = transport.open(SessionConfig(span=(2, 4), mode="generate", max_length=16))
    with pytest.raises(RemoteError) as exc:
        other.put_adapter(settings, state)  # layer 1 is outside [2, 4)
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
