"""``fedsplit serve --stages 2`` on a local Ray instance, tiny model: the same results as one process.

The Ray tests share one module-scoped local Ray (2 CPUs), one 2-stage server and one single-process
server; each Ray call is bounded (``ray.get`` timeouts, the stages' restart wait).
"""

import asyncio
import copy
import dataclasses
import math
import threading

import grpc
import pytest
import torch

from fedsplit.client.core import SplitClient
from fedsplit.client.remote import RemoteError, RemoteTransport
from fedsplit.model.lora import LoraSettings, add_lora
from fedsplit.model.split import load_part
from fedsplit.server.config import ServerConfig, parse_stage_layers
from fedsplit.server.runner import build_servicer, start_background
from fedsplit.server.stages import plan_stages
from fedsplit.wire.protocol import SessionConfig

SPEC = "tiny-llama"
LORA = LoraSettings(rank=4, alpha=8.0)


# ------------------------------------------------------------------ without Ray


def test_stages_are_balanced_by_parameters_and_cover_the_held_layers():
    assert plan_stages([1] * 4, (0, 4), 2) == [(0, 2), (2, 4)]
    assert plan_stages([1] * 30, (0, 30), 4) == [(0, 7), (7, 14), (14, 22), (22, 30)]
    assert plan_stages([1] * 6, (1, 5), 2) == [(1, 3), (3, 5)]
    # a heavy layer gets a stage of its own
    assert plan_stages([1, 1, 1, 9], (0, 4), 2) == [(0, 3), (3, 4)]
    assert plan_stages([1] * 4, (0, 4), 2, ((0, 1), (1, 4))) == [(0, 1), (1, 4)]
    with pytest.raises(ValueError, match="cover the held layers"):
        plan_stages([1] * 4, (0, 4), 2, ((0, 1), (1, 3)))
    with pytest.raises(ValueError, match="--stages 5"):
        plan_stages([1] * 4, (0, 4), 5)


def test_stage_layers_option_takes_contiguous_spans():
    assert parse_stage_layers("0:2,2:4") == ((0, 2), (2, 4))
    for bad in ("0:2,3:4", "2:2", "a:b"):
        with pytest.raises(ValueError):
            parse_stage_layers(bad)


def test_missing_ray_is_one_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails
    with pytest.raises(ValueError, match="--stages needs Ray"):
        build_servicer(ServerConfig(model=SPEC, port=0, stages=2))


def test_ray_address_without_stages_is_refused():
    with pytest.raises(ValueError, match="--stages 2 or more"):
        build_servicer(ServerConfig(model=SPEC, port=0, ray_address="auto"))


def test_unsupported_mode_with_stages_is_refused_before_ray_starts():
    with pytest.raises(ValueError, match="does not run with --stages"):
        build_servicer(ServerConfig(model=SPEC, port=0, stages=2, mode="sequential"))


# ------------------------------------------------------------------ on a local Ray


@pytest.fixture(scope="module")
def servers():
    """(2-stage server, single-process server, local Ray), all stopped after the module."""
    ray = pytest.importorskip("ray")
    import logging

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    staged = one = None
    try:
        staged = start_background(
            build_servicer(ServerConfig(model=SPEC, port=0, host="127.0.0.1", stages=2, shutdown_grace=0.2))
        )
        one = start_background(build_servicer(ServerConfig(model=SPEC, port=0, shutdown_grace=0.2)))
        yield staged, one, ray
    finally:
        for srv in (staged, one):
            if srv is not None:
                srv.stop()
        ray.shutdown()


@pytest.fixture
def fingerprint():
    from fedsplit.model.loading import model_fingerprint

    return model_fingerprint(SPEC)


def make_client(address, p, q, fingerprint, lora=False):
    head, tail = load_part(SPEC, "head", p, q), load_part(SPEC, "tail", p, q)
    if lora:
        torch.manual_seed(5)
        add_lora(head, LORA)
        add_lora(tail, LORA)
    transport = RemoteTransport(address, wire_dtype="fp32", fingerprint=fingerprint, retries=0)
    return SplitClient(head, tail, transport, (p, 4 - q))


def batch():
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(10, 250, (2, 9), generator=gen)
    pad = torch.tensor([0, 4])
    labels = ids.masked_fill(torch.arange(9)[None] <= pad[:, None], -100)
    return {"input_ids": ids, "labels": labels, "pad_lengths": pad}


def on_loop(srv, coroutine, timeout=60):
    """Run ``coroutine`` on the server's event loop (where its sessions live)."""
    return asyncio.run_coroutine_threadsafe(coroutine, srv._loop).result(timeout)


@pytest.mark.ray
def test_the_body_is_split_into_two_stage_actors(servers):
    staged, _, _ = servers
    stages = staged.servicer.stages
    assert [s.span for s in stages] == [(0, 2), (2, 4)]
    assert staged.servicer.info().held_start == 0 and staged.servicer.info().held_end == 4


@pytest.mark.ray
@pytest.mark.parametrize("p, q", [(1, 1), (0, 0), (2, 1)])
def test_logits_and_greedy_tokens_equal_the_single_process_server(servers, fingerprint, tiny, p, q):
    staged, one, _ = servers
    b = batch()
    got = make_client(staged.address, p, q, fingerprint)
    want = make_client(one.address, p, q, fingerprint)
    assert torch.allclose(
        got.logits(b["input_ids"], b["pad_lengths"]), want.logits(b["input_ids"], b["pad_lengths"]), atol=1e-5
    )
    tokens = got.generate(b["input_ids"], b["pad_lengths"], max_new_tokens=10)
    assert torch.equal(tokens, want.generate(b["input_ids"], b["pad_lengths"], max_new_tokens=10))
    if (p, q) == (1, 1):  # and the unsplit model's
        model, _ = tiny
        model.generation_config.eos_token_id = None
        mask = (torch.arange(9)[None] >= b["pad_lengths"][:, None]).long()
        expected = model.generate(
            b["input_ids"], attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0
        )
        assert torch.equal(tokens, expected[:, 9:])


def _body_grads_one_process(srv, session_id):
    session = srv.servicer.sessions[session_id]
    suffix = f".{session.adapter}.weight"
    return {
        name.removesuffix(suffix) + ".weight": p.grad.clone()
        for name, p in session.body.named_parameters()
        if "lora_" in name and name.endswith(suffix) and p.grad is not None
    }


@pytest.mark.ray
def test_one_training_step_gives_the_single_process_lora_gradients(servers, fingerprint):
    staged, one, _ = servers
    clients = {}
    for name, srv in (("staged", staged), ("one", one)):
        clients[name] = client = make_client(srv.address, 1, 1, fingerprint, lora=True)
        client.start_training(
            SessionConfig(span=(1, 3), mode="train", lora=LORA, seed=3, max_batch=2, max_length=64)
        )
        loss, _ = client.loss_and_backward(batch())
        clients[name] = (client, loss)
    (got, loss_s), (want, loss_o) = clients["staged"], clients["one"]
    assert torch.allclose(loss_s, loss_o, rtol=1e-6)
    for part in ("head", "tail"):
        for (name, a), b in zip(getattr(got, part).named_parameters(), getattr(want, part).parameters()):
            if a.requires_grad:
                assert (a.grad - b.grad).norm() / b.grad.norm().clamp_min(1e-12) <= 1e-5, name
    staged_session = staged.servicer.sessions[got.train_session.id]
    body_s = on_loop(staged, staged_session.adapter_grads())
    body_o = _body_grads_one_process(one, want.train_session.id)
    assert body_s.keys() == body_o.keys() and len(body_s) > 0
    assert {int(k.split(".")[1]) for k in body_s} == {1, 2}  # both stages' layers
    for key in body_o:
        rel = (body_s[key] - body_o[key]).norm() / body_o[key].norm().clamp_min(1e-12)
        assert rel <= 1e-5, key
    # the step (with a global clip over both stages) keeps the adapters equal
    got.optimizer_step(clip_norm=0.01)
    want.optimizer_step(clip_norm=0.01)
    state_s = got.train_session.adapter_state()[1]
    state_o = want.train_session.adapter_state()[1]
    for key in state_o:
        assert torch.allclose(state_s[key], state_o[key], atol=1e-6), key
    got.train_session.close()
    want.train_session.close()


PARTS = (("a", 1, 1), ("b", 2, 0))  # (1, 1) runs on both stages, (2, 0) on stage 2 only


@pytest.mark.ray
def test_two_sessions_with_different_partitions_at_once(servers, fingerprint):
    staged, one, _ = servers
    errors, results = [], {}

    def work(client, name, p, q):
        try:
            client.start_training(
                SessionConfig(span=(p, 4 - q), mode="train", lora=LORA, seed=1, max_batch=2, max_length=64)
            )
            losses = [float(client.train_step(batch()).loss) for _ in range(3)]
            # generation through a generate session carrying the trained body adapter (put_adapter)
            tokens = client.generate(batch()["input_ids"], batch()["pad_lengths"], 5)
            client.train_session.close()
            results[name] = (losses, tokens)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    for srv, prefix in ((staged, "staged"), (one, "one")):
        # clients made one after the other: their LoRA init draws from the global RNG
        clients = {part: make_client(srv.address, p, q, fingerprint, lora=True) for part, p, q in PARTS}
        threads = [
            threading.Thread(target=work, args=(clients[part], f"{prefix}-{part}", p, q))
            for part, p, q in PARTS
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors, errors
    for part in ("a", "b"):
        losses_s, tokens_s = results[f"staged-{part}"]
        losses_o, tokens_o = results[f"one-{part}"]
        assert losses_s == pytest.approx(losses_o, rel=1e-4)
        assert losses_s[-1] < losses_s[0]
        assert torch.equal(tokens_s, tokens_o)


def _decode(srv, fingerprint, kill=None, steps=8):
    """Prefill + ``steps`` decode steps of random hidden states; ``kill(i)`` runs before step i."""
    transport = RemoteTransport(srv.address, wire_dtype="fp32", fingerprint=fingerprint, retries=0)
    session = transport.open(SessionConfig(span=(1, 4), mode="generate", max_length=32, max_batch=2))
    gen = torch.Generator().manual_seed(2)
    pad = torch.tensor([0, 2])
    outs = [session.forward(0, torch.randn(2, 5, 64, generator=gen), pad, 0)]
    for i in range(steps):
        if kill is not None:
            kill(i)
        outs.append(session.forward(i + 1, torch.randn(2, 1, 64, generator=gen), pad, 5 + i))
    session.close()
    return outs


@pytest.mark.ray
def test_concurrent_decode_sessions_pipeline_and_batch_through_the_stages(servers, fingerprint):
    """Four generation sessions at once: each stage batches the decode steps that queue while it
    computes; every session's output equals the one-process server's."""
    staged, one, ray = servers
    outputs, errors = {}, []

    def work(srv, key):
        try:
            outputs[key] = _decode(srv, fingerprint, steps=12)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    for srv, name in ((staged, "staged"), (one, "one")):
        threads = [threading.Thread(target=work, args=(srv, (name, i))) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors, errors
    for i in range(4):
        for a, b in zip(outputs[("staged", i)], outputs[("one", 0)]):
            assert torch.allclose(a, b, atol=1e-5)
    stats = ray.get([s.actor.describe.remote() for s in staged.servicer.stages], timeout=60)
    assert all(st["decode_rows"] >= st["decode_batches"] > 0 for st in stats)


@pytest.mark.ray
@pytest.mark.parametrize("victim", [1, 0])
def test_killing_a_stage_mid_generation_gives_identical_output(servers, fingerprint, victim):
    staged, one, ray = servers
    stage = staged.servicer.stages[victim]
    before = ray.get(stage.actor.ping.remote(), timeout=60)

    def kill(i):
        if i == 3:
            ray.kill(stage.actor, no_restart=False)  # Ray restarts it; the session replays into it

    got = _decode(staged, fingerprint, kill)
    want = _decode(one, fingerprint)
    assert ray.get(stage.actor.ping.remote(), timeout=60) != before  # it did restart
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)
    # and the replay rebuilt the restarted stage's cache exactly as the uninterrupted stage's
    assert torch.equal(got[-1], _decode(staged, fingerprint)[-1])


@pytest.mark.ray
def test_a_training_session_on_a_restarted_stage_ends_unavailable(servers, fingerprint):
    staged, _, ray = servers
    client = make_client(staged.address, 1, 1, fingerprint, lora=True)
    client.start_training(SessionConfig(span=(1, 3), mode="train", lora=LORA, max_batch=2, max_length=64))
    client.train_step(batch())
    ray.kill(staged.servicer.stages[1].actor, no_restart=False)
    with pytest.raises(RemoteError) as exc:
        client.train_step(batch())
    assert exc.value.code in (grpc.StatusCode.UNAVAILABLE,)
    assert "restarted" in exc.value.message
    # the server goes on: a new session trains
    again = make_client(staged.address, 1, 1, fingerprint, lora=True)
    again.start_training(SessionConfig(span=(1, 3), mode="train", lora=LORA, max_batch=2, max_length=64))
    assert math.isfinite(float(again.train_step(batch()).loss))


@pytest.mark.ray
def test_training_run_resumes_from_the_stages_checkpoint(servers, fingerprint, tmp_path):
    """A named run on a 2-stage server with a checkpoint directory: every stage writes its own
    checkpoint; when a stage dies mid-run the stream ends UNAVAILABLE, and the re-opened run
    resumes on every stage from the checkpoint."""
    _, _, ray = servers
    config = ServerConfig(model=SPEC, port=0, stages=2, checkpoint_dir=str(tmp_path), shutdown_grace=0.2)
    with start_background(build_servicer(config)) as srv:
        client = make_client(srv.address, 1, 1, fingerprint, lora=True)
        run = SessionConfig(
            span=(1, 3), mode="train", lora=LORA, seed=2, max_batch=2, max_length=64, run_id="r1"
        )
        client.start_training(run)
        client.train_step(batch(), checkpoint=True)
        saved = copy.deepcopy(client.train_session.adapter_state()[1])
        client.train_step(batch())  # step 2, not checkpointed
        ray.kill(srv.servicer.stages[0].actor, no_restart=False)
        with pytest.raises(RemoteError) as exc:
            client.train_step(batch())
        assert exc.value.code == grpc.StatusCode.UNAVAILABLE and "latest checkpoint" in exc.value.message
        stage_dirs = sorted(p.name for p in tmp_path.glob("stage-*"))
        assert stage_dirs == ["stage-0-2", "stage-2-4"]
        again = make_client(srv.address, 1, 1, fingerprint, lora=True)
        again.start_training(dataclasses.replace(run, resume_steps=(1,)))
        assert again.train_session.opened_step == 1 and again.train_session.resumed
        state = again.train_session.adapter_state()[1]
        for key in saved:
            assert torch.equal(state[key], saved[key]), key


@pytest.mark.ray
@pytest.mark.parametrize("mode", ["server-hierarchical", "client-batch"])
def test_coordination_modes_on_stages_train_like_one_process(servers, fingerprint, mode):
    """Two clients at once. server-hierarchical: a body replica each, FedAvg every 2 steps;
    client-batch: one shared adapter, one joint body pass and step per round. The same losses and
    adapters as one process."""
    results, errors = {}, []

    def work(client, key, opened):
        try:
            client.start_training(
                SessionConfig(span=(1, 3), mode="train", lora=LORA, seed=4, max_batch=2, max_length=64)
            )
            opened.wait(timeout=60)  # both attached before the first forward: the rounds hold both
            losses = [float(client.train_step(batch()).loss) for _ in range(2)]
            results[key] = (losses, client.train_session.adapter_state()[1])
            client.train_session.close()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    for name, stages in (("staged", 2), ("one", 1)):
        config = ServerConfig(model=SPEC, port=0, stages=stages, mode=mode, sync_every=2, shutdown_grace=0.2)
        with start_background(build_servicer(config)) as srv:
            clients = [make_client(srv.address, 1, 1, fingerprint, lora=True) for _ in range(2)]
            opened = threading.Barrier(2)
            threads = [
                threading.Thread(target=work, args=(c, (name, i), opened)) for i, c in enumerate(clients)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
    assert not errors, errors
    for i in range(2):
        losses_s, state_s = results[("staged", i)]
        losses_o, state_o = results[("one", i)]
        assert losses_s == pytest.approx(losses_o, rel=1e-4)
        for key in state_o:
            assert torch.allclose(state_s[key], state_o[key], atol=1e-6), key
    # after the sync (server-hierarchical) or always (client-batch) both clients see one adapter
    for key, value in results[("staged", 0)][1].items():
        assert torch.allclose(value, results[("staged", 1)][1][key], atol=1e-7)
