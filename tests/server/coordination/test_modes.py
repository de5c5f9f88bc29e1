"""Sequential turns and server-hierarchical body sync, on the real coordinators in process."""

import asyncio

import pytest
import torch
from federation_helpers import open_train, ragged, run


def test_sequential_runs_one_client_step_at_a_time(make_servicer):
    servicer = make_servicer("sequential", round_timeout=10)
    coord = servicer.coordinator
    a, b = open_train(servicer, owner="a"), open_train(servicer, owner="b")
    assert a.adapter == b.adapter and a.optimizer is b.optimizer  # one body adapter, one AdamW
    hidden, pad = ragged(2, 6, 1)

    async def scenario():
        out = await coord.forward(a, 1, hidden, pad, 0)
        waiting = asyncio.create_task(coord.forward(b, 1, hidden, pad, 0))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # b waits for a's whole step
        await coord.backward(a, 1, torch.ones_like(out))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        await coord.step(a, 0.0)
        await asyncio.wait_for(waiting, 5)
        assert coord.turn.holder == b.id

    run(scenario())


def test_sequential_warmup_counts_the_steps_of_the_shared_body_not_of_each_client(make_servicer):
    servicer = make_servicer("sequential", round_timeout=10)
    coord = servicer.coordinator
    a, b = open_train(servicer, owner="a", warmup=4), open_train(servicer, owner="b", warmup=4)
    hidden, pad = ragged(2, 6, 1)
    lrs = []

    async def step(session):
        out = await coord.forward(session, 1, hidden, pad, 0)
        await coord.backward(session, 1, torch.ones_like(out))
        await coord.step(session, 0.0)
        lrs.append(a.optimizer.param_groups[0]["lr"])

    async def scenario():
        for session in (a, b, a, b, a):
            await step(session)

    run(scenario())
    assert lrs == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2])


def test_sequential_turn_passes_on_when_the_holder_leaves(make_servicer, caplog):
    servicer = make_servicer("sequential", round_timeout=10)
    coord = servicer.coordinator
    a, b = open_train(servicer, owner="a"), open_train(servicer, owner="b")
    hidden, pad = ragged(1, 4, 2)

    async def scenario():
        await coord.forward(a, 1, hidden, pad, 0)
        waiting = asyncio.create_task(coord.forward(b, 1, hidden, pad, 0))
        await asyncio.sleep(0.1)
        coord.detach(a)  # a's stream broke mid-step
        await asyncio.wait_for(waiting, 5)

    with caplog.at_level("WARNING"):
        run(scenario())
    assert "left during its step" in caplog.text


def _set_state(servicer, session, value):
    state = servicer.pool.state_dict(session.adapter)
    servicer.pool.load_state_dict(session.adapter, {k: torch.full_like(v, value) for k, v in state.items()})


def _zero_grad_step(servicer, session, rows, step_id):
    """A step whose gradient is zero: AdamW leaves the weights as they are, only the sync changes them."""
    hidden, pad = ragged(rows, 4, step_id)

    async def go():
        out = await servicer.coordinator.forward(session, step_id, hidden, pad, 0)
        await servicer.coordinator.backward(session, step_id, torch.zeros_like(out))
        await servicer.coordinator.step(session, 0.0)

    return go()


def test_hierarchical_sync_averages_replicas_weighted_by_examples(make_servicer):
    servicer = make_servicer("server-hierarchical", sync_every=1, round_timeout=10)
    a, b = open_train(servicer, owner="a"), open_train(servicer, owner="b")
    assert a.adapter != b.adapter  # one replica per client
    _set_state(servicer, a, 1.0)
    _set_state(servicer, b, 5.0)

    async def both():
        await asyncio.gather(_zero_grad_step(servicer, a, 2, 1), _zero_grad_step(servicer, b, 6, 1))

    run(both())
    for session in (a, b):
        state = servicer.pool.state_dict(session.adapter)
        for key, value in state.items():
            if key.startswith(("layers.1.", "layers.2.")):
                assert torch.allclose(value, torch.full_like(value, (2 * 1.0 + 6 * 5.0) / 8)), key
    assert servicer.coordinator.syncs == 1


def test_hierarchical_sync_of_identical_replicas_changes_nothing(make_servicer):
    servicer = make_servicer("server-hierarchical", sync_every=1, round_timeout=10)
    a, b = open_train(servicer, owner="a"), open_train(servicer, owner="b")
    before = servicer.pool.state_dict(a.adapter)
    assert all(torch.equal(before[k], v) for k, v in servicer.pool.state_dict(b.adapter).items())  # same seed

    async def both():
        await asyncio.gather(_zero_grad_step(servicer, a, 1, 1), _zero_grad_step(servicer, b, 3, 1))

    run(both())
    for session in (a, b):
        for key, value in servicer.pool.state_dict(session.adapter).items():
            assert torch.equal(value, before[key]), key


def test_hierarchical_sync_averages_each_layer_over_the_replicas_that_train_it(make_servicer):
    servicer = make_servicer("server-hierarchical", sync_every=1, round_timeout=10)
    a = open_train(servicer, span=(1, 3), owner="a")  # p = 1, q = 1
    b = open_train(servicer, span=(2, 3), owner="b")  # p = 2, q = 1: layer 1 is in b's head
    _set_state(servicer, a, 1.0)
    _set_state(servicer, b, 3.0)

    async def both():
        await asyncio.gather(_zero_grad_step(servicer, a, 1, 1), _zero_grad_step(servicer, b, 1, 1))

    run(both())
    state = servicer.pool.state_dict(a.adapter)
    layer1 = [v for k, v in state.items() if k.startswith("layers.1.")]
    layer2 = [v for k, v in state.items() if k.startswith("layers.2.")]
    assert all(torch.allclose(v, torch.ones_like(v)) for v in layer1)  # only a trains layer 1
    assert all(torch.allclose(v, torch.full_like(v, 2.0)) for v in layer2)


def test_hierarchical_sync_goes_ahead_without_a_silent_client(make_servicer, caplog):
    servicer = make_servicer("server-hierarchical", sync_every=1, round_timeout=0.5)
    a, quiet = open_train(servicer, owner="a"), open_train(servicer, owner="quiet")
    with caplog.at_level("WARNING"):
        run(_zero_grad_step(servicer, a, 1, 1), timeout=20)
    assert "round timeout" in caplog.text and quiet.id in caplog.text


def test_a_new_federation_starts_fresh_after_the_last_client_left(make_servicer):
    from fedsplit.wire import codec
    from fedsplit.wire import fedsplit_pb2 as pb

    servicer = make_servicer("sequential", round_timeout=10)
    coord = servicer.coordinator
    a = open_train(servicer, owner="a")
    fresh = servicer.pool.state_dict(a.adapter)
    hidden, pad = ragged(2, 6, 1)

    async def step_and_average(session, value):
        out = await coord.forward(session, 1, hidden, pad, 0)
        await coord.backward(session, 1, torch.ones_like(out))
        await coord.step(session, 0.0)
        upload = pb.AdapterUpload(
            round=1, num_examples=2, tensors=codec.named_tensors({"w": torch.full((2,), value)})
        )
        reply = await coord.head_tail.upload("t", upload)
        return codec.from_named_tensors(reply.tensors)["w"]

    assert torch.equal(run(step_and_average(a, 1.0)), torch.ones(2))
    assert any(not torch.equal(v, fresh[k]) for k, v in servicer.pool.state_dict(a.adapter).items())
    coord.detach(a)  # the last client closes its stream
    servicer.sessions.pop(a.id)
    servicer.executor.submit(lambda: None).result()  # the body worker has dropped the shared adapter
    b = open_train(servicer, owner="b")
    for key, value in servicer.pool.state_dict(b.adapter).items():
        assert torch.equal(value, fresh[key]), key  # the shared adapter starts again from its seeded init
    assert torch.equal(run(step_and_average(b, 3.0)), torch.full((2,), 3.0))  # round 1 is a new round


def test_interleaved_replicas_train_as_if_each_were_alone(make_servicer):
    def train(sessions, rounds=3):
        for step in range(rounds):
            for i, session in enumerate(sessions):
                hidden, pad = ragged(2, 6, 10 * i + step)
                out = session.forward(step, hidden, pad, 0)
                session.backward(step, out * 0.1 + 1.0)
                session.step()

    together = make_servicer("independent")
    a, b, c = (open_train(together, owner=o) for o in "abc")
    train([a, b, c])
    for i, session in enumerate((a, b, c)):
        alone = make_servicer("independent")
        solo = open_train(alone, owner="solo")
        for step in range(3):
            hidden, pad = ragged(2, 6, 10 * i + step)
            out = solo.forward(step, hidden, pad, 0)
            solo.backward(step, out * 0.1 + 1.0)
            solo.step()
        want, got = alone.pool.state_dict(solo.adapter), together.pool.state_dict(session.adapter)
        for key in want:
            assert torch.allclose(got[key], want[key], atol=1e-6), key


def test_a_forward_outdated_by_another_clients_step_is_refused_cleanly(make_servicer):
    import pytest

    from fedsplit.server.session import SessionError

    servicer = make_servicer("sequential", round_timeout=10)
    a, b = open_train(servicer, owner="a"), open_train(servicer, owner="b")
    hidden, pad = ragged(2, 6, 3)
    out_a = a.forward(1, hidden, pad, 0)  # bypassing the turn, as a misbehaving server path would
    out_b = b.forward(1, hidden, pad, 0)
    b.backward(1, torch.ones_like(out_b))
    b.step()
    with pytest.raises(SessionError) as err:
        a.backward(1, torch.ones_like(out_a))
    assert err.value.code == "FAILED_PRECONDITION"
    # nothing leaked into the shared grads
    assert all(p.grad is None for p in servicer.pool.parameters(a.adapter))
    again = a.forward(2, hidden, pad, 0)  # a new forward on the updated weights trains normally
    assert a.backward(2, torch.ones_like(again)).shape == hidden.shape
