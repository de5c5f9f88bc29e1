import torch

from fedsplit.model.split import load_part
from fedsplit.server.adapters import AdapterPool
from fedsplit.server.batching import run_batch
from fedsplit.server.session import BodySession
from fedsplit.wire.protocol import SessionConfig


def prefilled(body, pool, length, seed):
    session = BodySession(body, pool, SessionConfig(span=(1, 3), mode="generate", max_length=64, max_batch=2))
    gen = torch.Generator().manual_seed(seed)
    session.forward(0, torch.randn(1, length, 64, generator=gen), torch.zeros(1, dtype=torch.long), 0)
    return session


def test_decode_steps_of_sessions_with_different_cache_lengths_batch_exactly():
    body = load_part("tiny-llama", "body", span=(0, 4))
    pool = AdapterPool(body)
    steps = [torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    zero = torch.zeros(1, dtype=torch.long)
    # alone
    alone = [prefilled(body, pool, n, seed) for n, seed in ((3, 10), (7, 11))]
    expected = [s.forward(1, x, zero, s.cache.length) for s, x in zip(alone, steps)]
    # together: one body forward over both
    together = [prefilled(body, pool, n, seed) for n, seed in ((3, 10), (7, 11))]
    got = run_batch([(s, x, zero, s.cache.length) for s, x in zip(together, steps)])
    for e, g in zip(expected, got):
        assert (e - g).abs().max().item() <= 1e-5
    assert [s.cache.length for s in together] == [4, 8]
    # the caches split back correctly: a further solo step still matches
    nxt = torch.randn(1, 1, 64)
    for a, t in zip(alone, together):
        assert (
            a.forward(2, nxt, zero, a.cache.length) - t.forward(2, nxt, zero, t.cache.length)
        ).abs().max() <= 1e-5


def test_bad_step_in_a_batch_fails_alone():
    body = load_part("tiny-llama", "body", span=(0, 4))
    pool = AdapterPool(body)
    a, b = prefilled(body, pool, 3, 1), prefilled(body, pool, 4, 2)
    zero = torch.zeros(1, dtype=torch.long)
    results = run_batch([(a, torch.randn(1, 1, 64), zero, 99), (b, torch.randn(1, 1, 64), zero, 4)])
    assert isinstance(results[0], Exception) and isinstance(results[1], torch.Tensor)
