"""The modes over real gRPC on loopback: client-batch equals the union, FedAvg rounds, dropped clients."""

import logging
import threading
import time

import pytest
import torch
from federation_helpers import LORA

from fedsplit.client.config import TrainConfig
from fedsplit.client.core import LocalTransport, SplitClient
from fedsplit.client.federated import FederatedTransport, head_tail_state, target_tokens
from fedsplit.client.remote import RemoteError
from fedsplit.client.train import build_client, run_training
from fedsplit.model.loading import model_fingerprint
from fedsplit.model.split import load_part
from fedsplit.server.config import ServerConfig
from fedsplit.server.runner import build_servicer, start_background
from fedsplit.wire import fedsplit_pb2 as pb
from fedsplit.wire.protocol import SessionConfig

SPEC, SPAN = "tiny-llama", (1, 3)
FINGERPRINT = model_fingerprint(SPEC)


@pytest.fixture
def serve():
    servers = []

    def start(mode, **options):
        srv = start_background(build_servicer(ServerConfig(model=SPEC, port=0, mode=mode, **options)))
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


def train_config(seed=3):
    return SessionConfig(span=SPAN, mode="train", lora=LORA, lr=1e-2, seed=seed, max_batch=8, max_length=64)


def client_batch(client, step):
    """A batch per client and step, with a different length per client (ragged rounds)."""
    gen = torch.Generator().manual_seed(100 * client + step)
    rows, length = 2, 6 + 3 * client
    ids = torch.randint(10, 250, (rows, length), generator=gen)
    pad = torch.tensor([0, client + 1])
    labels = ids.masked_fill(torch.arange(length)[None] <= pad[:, None] + 1, -100)
    return {"input_ids": ids, "labels": labels, "pad_lengths": pad}


def union_of(batches):
    longest = max(b["input_ids"].shape[1] for b in batches)

    def left(t, fill):
        return torch.nn.functional.pad(t, (longest - t.shape[1], 0), value=fill)

    return {
        "input_ids": torch.cat([left(b["input_ids"], 0) for b in batches]),
        "labels": torch.cat([left(b["labels"], -100) for b in batches]),
        "pad_lengths": torch.cat([b["pad_lengths"] + longest - b["input_ids"].shape[1] for b in batches]),
    }


def frozen_client(transport):
    """Head and tail without LoRA: every client sends what the union client sends, step after step."""
    head, tail = load_part(SPEC, "head", 1, 1), load_part(SPEC, "tail", 1, 1)
    for p in [*head.parameters(), *tail.parameters()]:
        p.requires_grad_(False)
    return SplitClient(head, tail, transport, SPAN)


def in_threads(fns, timeout=120):
    errors, threads = [], []
    for fn in fns:

        def wrapped(fn=fn):
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads.append(threading.Thread(target=wrapped))
        threads[-1].start()
    for thread in threads:
        thread.join(timeout)
    assert not any(t.is_alive() for t in threads), "a client is stuck"
    assert not errors, errors


def test_client_batch_over_grpc_trains_the_body_like_one_client_with_the_union(serve, caplog):
    srv = serve("client-batch", round_timeout=20)
    transports = [
        FederatedTransport(srv.address, wire_dtype="fp32", fingerprint=FINGERPRINT) for _ in range(3)
    ]
    clients = [frozen_client(t) for t in transports]
    for c in clients:
        c.start_training(train_config())
    steps = 3

    def run_client(i):
        for step in range(steps):
            batch = client_batch(i, step)
            clients[i].train_session.loss_weight = target_tokens(batch)
            clients[i].train_step(batch)

    in_threads([lambda i=i: run_client(i) for i in range(3)])
    coord = srv.servicer.coordinator
    assert coord.rounds == steps  # one body forward per round
    assert coord.members == 3 * steps and coord.updates == steps  # every round full, one update each
    _, got = clients[0].train_session.adapter_state()

    union = frozen_client(LocalTransport(load_part(SPEC, "body", span=(0, 4))))
    union.start_training(train_config())
    for step in range(steps):
        union.train_step(union_of([client_batch(i, step) for i in range(3)]))
    _, want = union.train_session.adapter_state()
    for key, value in want.items():
        if key.startswith(("layers.1.", "layers.2.")):
            assert torch.allclose(got[key], value, atol=2e-5), key
    caplog.set_level(logging.INFO, logger="fedsplit.server.coordination.client_batch")
    for c, t in zip(clients, transports):
        c.train_session.close()  # a closed session (not a dropped stream, which is parked) leaves
        t.close()
    deadline = time.monotonic() + 10
    summary = "client-batch: 3 round(s) of 3.0 client(s) on average, 3 body update(s), 0 forward round(s)"
    while summary not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert summary in caplog.text
    assert (coord.rounds, coord.members, coord.updates) == (0, 0, 0)  # the next federation counts afresh


def _open_round_alone(client):
    """``client``'s forward of step 1, sent while it is the only one attached: a round of its own."""
    batch = client_batch(0, 0)
    out = client.train_session.forward(
        1, client.head(batch["input_ids"], batch["pad_lengths"]), batch["pad_lengths"], 0
    )
    return torch.ones_like(out)


def test_a_client_that_attaches_mid_round_waits_for_the_next_round(serve):
    # Before the fix its forward ran at once, as a second round on the shared adapter; the first
    # round's optimiser step then changed the weights under that forward's graph, and the
    # second round's backward failed in autograd (seen in CI with two `fedsplit train` clients).
    srv = serve("client-batch", round_timeout=20)
    ta, tb = (FederatedTransport(srv.address, wire_dtype="fp32", fingerprint=FINGERPRINT) for _ in range(2))
    a, b = frozen_client(ta), frozen_client(tb)
    a.start_training(train_config())
    grad = _open_round_alone(a)
    b.start_training(train_config())
    done = threading.Event()
    late = threading.Thread(target=lambda: (b.train_step(client_batch(1, 0)), done.set()))
    late.start()
    assert not done.wait(0.5)  # b's forward waits while a's round is open
    a.train_session.backward(1, grad)
    a.train_session.step()  # in place on the shared adapter: no forward of another round may be pending
    in_threads([lambda: a.train_step(client_batch(0, 1))])
    late.join(30)
    assert done.is_set()
    coord = srv.servicer.coordinator
    assert (coord.rounds, coord.members, coord.updates) == (2, 3, 2)  # a alone, then a and b together
    for t in (ta, tb):
        t.close()


def test_a_round_still_open_after_the_timeout_is_closed_by_the_next(serve, caplog):
    srv = serve("client-batch", round_timeout=1)
    ta, tb = (FederatedTransport(srv.address, wire_dtype="fp32", fingerprint=FINGERPRINT) for _ in range(2))
    a, b = frozen_client(ta), frozen_client(tb)
    a.start_training(train_config())
    grad = _open_round_alone(a)  # ... and a goes silent
    b.start_training(train_config())
    with caplog.at_level("WARNING"):
        in_threads([lambda: b.train_step(client_batch(1, 0))], timeout=30)  # goes ahead after 1 s
    assert "client-batch round 1: still open after the round timeout" in caplog.text
    with pytest.raises(RemoteError, match="NOT_FOUND"):
        a.train_session.backward(1, grad)  # too late: its round was closed, it must send the forward again
    coord = srv.servicer.coordinator
    assert (coord.rounds, coord.updates) == (2, 1)  # the closed round never stepped
    for t in (ta, tb):
        t.close()


def test_a_client_that_disconnects_mid_round_does_not_block_the_others(serve, caplog):
    srv = serve("client-batch", round_timeout=2)
    a_transport = FederatedTransport(srv.address, wire_dtype="fp32", fingerprint=FINGERPRINT)
    b_transport = FederatedTransport(srv.address, wire_dtype="fp32", fingerprint=FINGERPRINT)
    a, b = frozen_client(a_transport), frozen_client(b_transport)
    a.start_training(train_config())
    b.start_training(train_config())
    batch = client_batch(0, 0)

    def b_forward_then_vanish():
        b.train_session.forward(1, b.head(batch["input_ids"], batch["pad_lengths"]), batch["pad_lengths"], 0)
        b_transport.channel.close()  # gone between its forward and its backward

    with caplog.at_level("WARNING"):
        in_threads([lambda: a.train_step(batch), b_forward_then_vanish], timeout=60)
        in_threads([lambda: a.train_step(client_batch(0, 1))], timeout=60)  # later rounds go on without b
    assert "left mid-round" in caplog.text or "round timeout" in caplog.text
    a_transport.close()


def test_head_tail_fedavg_round_is_weighted_by_examples(serve):
    srv = serve("sequential", fedavg_every=5, round_timeout=20)
    transports = [FederatedTransport(srv.address, fingerprint=FINGERPRINT) for _ in range(2)]
    sessions = [t.open(train_config()) for t in transports]  # two training clients: a round waits for both
    info = transports[0].info()
    assert info.federation_mode == pb.SEQUENTIAL and info.fedavg_every == 5
    uploads = [
        ({"layers.0.q.lora_A.weight": torch.full((2, 3), 1.0), "only.a": torch.ones(1)}, 1),
        ({"layers.0.q.lora_A.weight": torch.full((2, 3), 5.0)}, 3),
    ]
    replies = [None, None]

    def upload(i):
        replies[i] = transports[i].fedavg(1, uploads[i][0], uploads[i][1], f"c{i}", timeout=30)

    in_threads([lambda i=i: upload(i) for i in range(2)])
    for (mean, clients), (state, _) in zip(replies, uploads):
        assert clients == 2 and mean.keys() == state.keys()  # each client gets back the keys it sent
        assert torch.allclose(mean["layers.0.q.lora_A.weight"], torch.full((2, 3), 4.0))
    assert torch.equal(replies[0][0]["only.a"], torch.ones(1))
    late, clients = transports[1].fedavg(1, uploads[1][0], 99, "late")  # a closed round: its average
    assert clients == 2 and torch.allclose(late["layers.0.q.lora_A.weight"], torch.full((2, 3), 4.0))
    for s, t in zip(sessions, transports):
        s.close()
        t.close()


def test_head_tail_round_goes_ahead_without_a_missing_client(serve, caplog):
    srv = serve("server-hierarchical", sync_every=4, round_timeout=1)
    transports = [FederatedTransport(srv.address, fingerprint=FINGERPRINT) for _ in range(2)]
    sessions = [t.open(train_config()) for t in transports]
    assert transports[0].info().fedavg_every == 4  # heads and tails follow the body sync
    with caplog.at_level("WARNING"):
        mean, clients = transports[0].fedavg(1, {"w": torch.ones(2)}, 8, "alone", timeout=30)
    assert clients == 1 and torch.equal(mean["w"], torch.ones(2))
    assert "round timeout" in caplog.text
    for s, t in zip(sessions, transports):
        s.close()
        t.close()


def test_fedsplit_train_clients_join_the_servers_mode_and_fedavg_rounds(serve):
    srv = serve("client-batch", round_timeout=20, fedavg_every=2)
    summaries, clients = {}, {}

    def train(seed):
        cfg = TrainConfig(
            model=SPEC,
            server=srv.address,
            head_layers=1,
            tail_layers=1,
            task="sentiment",
            steps=3,
            batch_size=2,
            max_length=48,
            eval_examples=4,
            wire_dtype="fp32",
            seed=seed,
            body_lr=2e-2,
            body_warmup=2,
        )
        clients[seed] = build_client(cfg)
        summaries[seed] = run_training(cfg, client=clients[seed], progress=False)

    in_threads([lambda s=s: train(s) for s in (0, 1)])
    for summary in summaries.values():
        assert summary["federation"] == {"mode": "client-batch", "fedavg_every": 2, "fedavg_rounds": 2}
    # the heads and tails started from different seeds; the last FedAvg round leaves them equal
    a, b = (head_tail_state(clients[s]) for s in (0, 1))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.allclose(a[key], b[key]), key
    body_lr = srv.servicer.coordinator.optimizer.param_groups[0]["lr"]
    assert body_lr == pytest.approx(2e-2)  # --body-lr, ramped up
