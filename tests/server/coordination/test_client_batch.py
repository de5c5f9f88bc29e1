"""client-batch: one forward, one backward, one step for the whole round — the union's update."""

import asyncio

import pytest
import torch
import torch.nn.functional as F
from federation_helpers import open_train, ragged, run

from fedsplit.server.coordination.base import SHARED_ADAPTER

CLIENTS = [ragged(2, 5, 1), ragged(3, 9, 2), ragged(1, 7, 3)]  # ragged lengths: 5, 9 and 7 tokens
WEIGHTS = [4.0, 11.0, 2.0]  # target tokens per client


def grads_for(seed=9):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(h.shape, generator=gen) for h, _ in CLIENTS]


def adapter_grads(servicer, adapter):
    """Gradients of an adapter's weights by layer-global name (layers outside the span have none)."""
    suffix = f".{adapter}.weight"
    return {
        name.removesuffix(suffix): p.grad.clone()
        for name, p in servicer.body.named_parameters()
        if name.endswith(suffix) and p.grad is not None
    }


def union_batch(grads):
    """One client holding every batch: left-pad to the longest, gradient of the token-mean loss."""
    longest = max(h.shape[1] for h, _ in CLIENTS)
    total = sum(WEIGHTS)
    hidden = torch.cat([F.pad(h, (0, 0, longest - h.shape[1], 0)) for h, _ in CLIENTS])
    pad = torch.cat([p + longest - h.shape[1] for h, p in CLIENTS])
    grad = torch.cat([F.pad(g * w / total, (0, 0, longest - g.shape[1], 0)) for g, w in zip(grads, WEIGHTS)])
    return hidden, pad, grad, longest


def rows_of(i, longest):
    start = sum(h.shape[0] for h, _ in CLIENTS[:i])
    h = CLIENTS[i][0]
    return slice(start, start + h.shape[0]), slice(longest - h.shape[1], longest)


@pytest.mark.parametrize("warmup", [0, 4])
def test_client_batch_round_equals_one_client_holding_the_union(make_servicer, warmup):
    servicer = make_servicer("client-batch", round_timeout=10)
    coord = servicer.coordinator
    sessions = [open_train(servicer, owner=f"c{i}", warmup=warmup) for i in range(3)]
    grads = grads_for()

    async def forward_backward(i):
        hidden, pad = CLIENTS[i]
        out = await coord.forward(sessions[i], 1, hidden, pad, 0)
        grad_in = await coord.backward(sessions[i], 1, grads[i], WEIGHTS[i])
        return out, grad_in

    async def round_trip():
        return await asyncio.gather(*(forward_backward(i) for i in range(3)))

    results = run(round_trip())
    assert coord.rounds == 1  # one body forward for the three clients
    batched_grads = adapter_grads(servicer, SHARED_ADAPTER)

    reference = make_servicer("independent")
    union = open_train(reference, warmup=warmup)
    hidden, pad, grad, longest = union_batch(grads)
    out_ref = union.forward(1, hidden, pad, 0)
    grad_in_ref = union.backward(1, grad)
    union_grads = adapter_grads(reference, union.adapter)

    assert batched_grads.keys() == union_grads.keys() and batched_grads
    for key, want in union_grads.items():
        assert torch.allclose(batched_grads[key], want, rtol=1e-5, atol=1e-7), key
    total = sum(WEIGHTS)
    for i, (out, grad_in) in enumerate(results):
        rows, cols = rows_of(i, longest)
        assert torch.allclose(out, out_ref[rows, cols], atol=1e-5)
        # each client gets the gradient of its own loss back, as in any other mode
        assert torch.allclose(grad_in, grad_in_ref[rows, cols] * total / WEIGHTS[i], rtol=1e-4, atol=1e-6)

    # the round's step is one optimiser step on the shared adapter: the union's step
    async def steps():
        await asyncio.gather(*(coord.step(s, 0.0) for s in sessions))

    run(steps())
    union.step()
    got, want = servicer.pool.state_dict(SHARED_ADAPTER), reference.pool.state_dict(union.adapter)
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-6), key
    # with a warm-up, the round's one step is the adapter's first: a quarter of the lr
    assert coord.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 4 if warmup else 1e-2)


def test_ragged_clients_get_what_they_would_get_alone(make_servicer):
    servicer = make_servicer("client-batch", round_timeout=10)
    sessions = [open_train(servicer, owner=f"c{i}") for i in range(3)]

    async def forwards():
        return await asyncio.gather(
            *(servicer.coordinator.forward(s, 1, h, p, 0) for s, (h, p) in zip(sessions, CLIENTS))
        )

    outs = run(forwards())
    alone = open_train(make_servicer("independent"))
    for i, ((hidden, pad), out) in enumerate(zip(CLIENTS, outs)):
        want = alone.forward(10 + i, hidden, pad, 0)
        real = torch.arange(hidden.shape[1])[None] >= pad[:, None]  # pad positions carry no information
        assert out.shape == hidden.shape
        assert torch.allclose(out[real], want[real], atol=1e-5)


def test_a_round_without_a_missing_client_goes_ahead_after_the_timeout(make_servicer, caplog):
    servicer = make_servicer("client-batch", round_timeout=0.5)
    present, _absent = open_train(servicer, owner="a"), open_train(servicer, owner="b")
    hidden, pad = CLIENTS[0]

    async def step():
        out = await servicer.coordinator.forward(present, 1, hidden, pad, 0)
        await servicer.coordinator.backward(present, 1, torch.ones_like(out), 3.0)
        await servicer.coordinator.step(present, 0.0)
        return out

    with caplog.at_level("WARNING"):
        out = run(step(), timeout=20)
    assert out.shape == hidden.shape
    assert "round timeout" in caplog.text and _absent.id in caplog.text
