"""server-hierarchical: forwards queued while the worker is busy run as one pass of many replicas."""

import asyncio
import threading

import pytest
import torch
from federation_helpers import open_train, ragged, run

CLIENTS = [ragged(2, 5, 1), ragged(3, 9, 2), ragged(1, 7, 3)]  # ragged lengths: 5, 9 and 7 tokens
EVEN = [ragged(2, 5, 1), ragged(2, 9, 2), ragged(2, 7, 3)]  # as many rows each: the stacked-matmul path
SEEDS = [3, 4, 5]  # a different replica per client


def _grads(clients=CLIENTS, seed=9):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(h.shape, generator=gen) for h, _ in clients]


def _trained_alone(make_servicer, seed, hidden, pad, grad):
    """One training step of a replica by itself: its output, input gradient and adapter afterwards."""
    alone = make_servicer("independent")
    solo = open_train(alone, seed=seed, owner="solo")
    out = solo.forward(1, hidden, pad, 0)
    grad_in = solo.backward(1, grad)
    solo.step()
    return out, grad_in, alone.pool.state_dict(solo.adapter)


async def _queued_forwards(servicer, sessions, clients=CLIENTS):
    """Forwards sent while the body worker is busy, so they queue and run together."""
    gate = threading.Event()
    servicer.executor.submit(gate.wait, 10)
    tasks = [
        asyncio.create_task(servicer.coordinator.forward(s, 1, h, p, 0))
        for s, (h, p) in zip(sessions, clients)
    ]
    await asyncio.sleep(0.2)
    gate.set()
    return await asyncio.gather(*tasks)


@pytest.mark.parametrize("clients", [CLIENTS, EVEN], ids=["ragged-rows", "even-rows"])
def test_queued_replica_forwards_run_as_one_pass_and_train_each_replica_as_if_alone(make_servicer, clients):
    servicer = make_servicer("server-hierarchical", round_timeout=10)
    coord = servicer.coordinator
    sessions = [open_train(servicer, seed=seed, owner=f"c{i}") for i, seed in enumerate(SEEDS)]
    grads = _grads(clients)

    async def train_step():
        outs = await _queued_forwards(servicer, sessions, clients)
        grad_ins = await asyncio.gather(*(coord.backward(s, 1, g) for s, g in zip(sessions, grads)))
        await asyncio.gather(*(coord.step(s, 0.0) for s in sessions))
        return outs, grad_ins

    outs, grad_ins = run(train_step())
    # one pass, 3 replicas
    assert coord.passes == 1 and coord.joint_rows == sum(h.shape[0] for h, _ in clients)

    for i, ((hidden, pad), seed) in enumerate(zip(clients, SEEDS)):
        want_out, want_grad_in, want = _trained_alone(make_servicer, seed, hidden, pad, grads[i])
        real = torch.arange(hidden.shape[1])[None] >= pad[:, None]
        assert torch.allclose(outs[i][real], want_out[real], atol=1e-5)
        assert torch.allclose(grad_ins[i][real], want_grad_in[real], rtol=1e-4, atol=1e-6)
        got = servicer.pool.state_dict(sessions[i].adapter)
        assert any(
            not torch.equal(v, servicer.pool.state_dict(sessions[i - 1].adapter)[k]) for k, v in got.items()
        )
        for key in want:
            assert torch.allclose(got[key], want[key], atol=1e-6), key


def test_a_replica_pass_goes_ahead_without_a_client_that_left(make_servicer, caplog):
    servicer = make_servicer("server-hierarchical", round_timeout=30)
    coord = servicer.coordinator
    sessions = [open_train(servicer, seed=seed, owner=f"c{i}") for i, seed in enumerate(SEEDS)]
    grads = _grads()

    async def scenario():
        outs = await _queued_forwards(servicer, sessions)
        coord.detach(sessions[2])  # its stream broke before it sent its gradient
        started = asyncio.get_running_loop().time()
        grad_ins = await asyncio.gather(*(coord.backward(s, 1, g) for s, g in zip(sessions[:2], grads)))
        return outs, grad_ins, asyncio.get_running_loop().time() - started

    with caplog.at_level("WARNING"):
        outs, grad_ins, waited = run(scenario())
    assert waited < 5  # not the 30 s round timeout
    assert "left mid-round" in caplog.text
    assert [g.shape for g in grad_ins] == [h.shape for h, _ in CLIENTS[:2]]
    no_update = servicer.pool.parameters(sessions[2].adapter)
    assert all(p.grad is None or not p.grad.any() for p in no_update)
    assert any(p.grad is not None and p.grad.any() for p in servicer.pool.parameters(sessions[0].adapter))


def test_a_pass_goes_ahead_without_a_silent_client_whose_late_gradient_is_refused(make_servicer, caplog):
    from fedsplit.server.session import SessionError

    servicer = make_servicer("server-hierarchical", round_timeout=1)
    coord = servicer.coordinator
    sessions = [open_train(servicer, seed=seed, owner=f"c{i}") for i, seed in enumerate(SEEDS)]
    straggler = sessions[2]
    grads = _grads()
    before = {k: v.clone() for k, v in servicer.pool.state_dict(straggler.adapter).items()}

    async def scenario():
        await _queued_forwards(servicer, sessions)
        # The straggler is still attached but sends its gradient only after the round timeout.
        await asyncio.gather(*(coord.backward(s, 1, g) for s, g in zip(sessions[:2], grads)))
        await asyncio.gather(*(coord.step(s, 0.0) for s in sessions[:2]))
        with pytest.raises(SessionError) as late:
            await coord.backward(straggler, 1, grads[2])
        # It starts over with a new forward, alone this time, and trains as usual.
        hidden, pad = CLIENTS[2]
        await coord.forward(straggler, 2, hidden, pad, 0)
        grad_in = await coord.backward(straggler, 2, grads[2])
        await coord.step(straggler, 0.0)
        return late.value, grad_in

    with caplog.at_level("WARNING"):
        late, grad_in = run(scenario())
    assert "round timeout" in caplog.text and "missing: " + straggler.id in caplog.text
    assert late.code == "NOT_FOUND"  # a clean answer, not an autograd failure
    assert grad_in.shape == CLIENTS[2][0].shape and grad_in.abs().sum() > 0
    after = servicer.pool.state_dict(straggler.adapter)
    assert any(not torch.equal(after[k], before[k]) for k in before)  # its own step, after the retry
    assert coord.passes == 1 and coord.alone == 1
    # Nothing of the closed pass leaked into that step: it is the step of a client alone.
    *_, want = _trained_alone(make_servicer, SEEDS[2], *CLIENTS[2], grads[2])
    for key in want:
        assert torch.allclose(after[key], want[key], atol=1e-6), key


def test_a_second_forward_before_the_step_is_refused(make_servicer):
    from fedsplit.server.session import SessionError

    servicer = make_servicer("server-hierarchical", round_timeout=10)
    sessions = [open_train(servicer, seed=seed, owner=f"c{i}") for i, seed in enumerate(SEEDS)]

    async def scenario():
        await _queued_forwards(servicer, sessions)
        hidden, pad = CLIENTS[0]
        with pytest.raises(SessionError) as err:
            await servicer.coordinator.forward(sessions[0], 2, hidden, pad, 0)
        assert err.value.code == "FAILED_PRECONDITION"

    run(scenario())


def test_a_pass_waits_briefly_for_the_clients_about_to_send_a_forward(make_servicer):
    servicer = make_servicer("server-hierarchical", round_timeout=10, gather_ms=3000)
    coord = servicer.coordinator
    a, b = (open_train(servicer, seed=seed, owner=o) for seed, o in zip(SEEDS, "ab"))
    (ha, pa), (hb, pb) = CLIENTS[:2]

    async def scenario():
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = asyncio.create_task(coord.forward(a, 1, ha, pa, 0))
        await asyncio.sleep(0.3)  # b is still computing its head
        await coord.forward(b, 1, hb, pb, 0)
        await first
        return loop.time() - started

    waited = run(scenario())
    assert coord.passes == 1 and coord.alone == 0  # a's forward waited for b's and both ran in one pass
    assert waited < 2.5  # not the whole 3 s: the pass ran as soon as b's forward arrived
