"""The KV cache appends in place: the cost of a step does not grow with the context, the values are exact."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fedsplit.model.kv_cache import KVCache
from fedsplit.model.segments import KVCache as KVCacheFromSegments
from fedsplit.model.split import split

ROWS, HEADS, HEAD_DIM = 2, 3, 8


def step(
    generator: torch.Generator, tokens: int = 1, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (ROWS, HEADS, tokens, HEAD_DIM)
    return torch.randn(shape, generator=generator).to(dtype), torch.randn(shape, generator=generator).to(
        dtype
    )


class CountWrites(TorchDispatchMode):
    """Counts the elements every non-view op writes (copies, concatenations, allocations)."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            results = out if isinstance(out, (tuple, list)) else (out,)
            self.elements += sum(r.numel() for r in results if isinstance(r, torch.Tensor))
        return out


def test_segments_still_exports_the_cache_class():
    assert KVCacheFromSegments is KVCache


def test_a_thousand_single_token_appends_copy_linear_bytes_and_reallocate_logarithmically_often():
    generator = torch.Generator().manual_seed(0)
    steps = [step(generator) for _ in range(1000)]
    cache = KVCache(block=256)
    storages = set()
    counter = CountWrites()
    with counter:
        for key, value in steps:
            with_key, with_value = cache.update(key, value, layer_idx=5)
            storages.add(with_key.untyped_storage().data_ptr())
    # Capacity 256 -> 512 -> 1024: three buffers in all, not one per step.
    assert len(storages) == 3
    per_token = 2 * ROWS * HEADS * HEAD_DIM  # key + value elements of one token
    # Appends (1000 tokens) + new buffers (256 + 512 + 1024) + moving the old content (256 + 512):
    # 3560 tokens' worth; concatenating at every step would write about 1000²/2 = 500k tokens' worth.
    assert counter.elements <= 3560 * per_token
    assert torch.equal(with_key, torch.cat([k for k, _ in steps], dim=-2))
    assert torch.equal(with_value, torch.cat([v for _, v in steps], dim=-2))
    assert cache.nbytes() == 2 * ROWS * HEADS * 1024 * HEAD_DIM * 4  # what is reserved, spare room included


def test_the_returned_keys_are_views_of_the_current_length_on_the_incoming_device_and_dtype():
    generator = torch.Generator().manual_seed(1)
    cache = KVCache(block=16)
    prefill = step(generator, tokens=5, dtype=torch.bfloat16)
    key, value = cache.update(*prefill, layer_idx=0)
    assert key.shape == (ROWS, HEADS, 5, HEAD_DIM) and key.dtype == value.dtype == torch.bfloat16
    assert key.device == prefill[0].device
    key, _ = cache.update(*step(generator, dtype=torch.bfloat16), layer_idx=0)
    assert key.shape[-2] == 6 and torch.equal(key[..., :5, :], prefill[0])


def test_layers_maps_each_layer_to_its_current_key_and_value_and_can_be_replaced():
    generator = torch.Generator().manual_seed(2)
    cache = KVCache(block=8)
    first = step(generator, tokens=3)
    cache.update(*first, layer_idx=2)
    cache.update(*step(generator, tokens=3), layer_idx=7)
    assert sorted(cache.layers) == [2, 7] and len(cache.layers) == 2 and bool(cache.layers)
    key, value = cache.layers[2]
    assert key.shape[-2] == 3 and torch.equal(key, first[0]) and torch.equal(value, first[1])

    # Continuous batching swaps in tensors it built (merged or split-back caches) ...
    merged_key, merged_value = torch.randn(4, HEADS, 6, HEAD_DIM), torch.randn(4, HEADS, 6, HEAD_DIM)
    cache.layers = {2: (merged_key, merged_value)}
    assert sorted(cache.layers) == [2]
    # ... and the next append continues after them.
    extra = torch.randn(4, HEADS, 1, HEAD_DIM), torch.randn(4, HEADS, 1, HEAD_DIM)
    key, value = cache.update(*extra, layer_idx=2)
    assert torch.equal(key, torch.cat([merged_key, extra[0]], dim=-2))
    assert torch.equal(value, torch.cat([merged_value, extra[1]], dim=-2))
    cache.layers[3] = (merged_key, merged_value)  # item assignment works on the mapping too
    assert torch.equal(cache.layers[3][0], merged_key)
    del cache.layers[3]
    assert 3 not in cache.layers


def test_an_empty_cache_has_no_layers_and_no_bytes():
    cache = KVCache()
    assert not cache.layers and cache.nbytes() == 0 and cache.get_seq_length() == 0


def test_select_rows_keeps_the_chosen_rows_and_their_room_to_grow():
    generator = torch.Generator().manual_seed(3)
    cache = KVCache(block=8)
    prefill = step(generator, tokens=3)
    cache.update(*prefill, layer_idx=0)
    reserved = cache.nbytes()
    cache.select_rows([1])
    key, _ = cache.layers[0]
    assert key.shape == (1, HEADS, 3, HEAD_DIM) and torch.equal(key, prefill[0][1:])
    assert cache.nbytes() == reserved // ROWS
    nxt = torch.randn(1, HEADS, 1, HEAD_DIM)
    before = key.untyped_storage().data_ptr()
    key, _ = cache.update(nxt, nxt, layer_idx=0)
    assert key.untyped_storage().data_ptr() == before  # written into the room it kept


def test_keys_of_other_rows_or_heads_are_refused_not_broadcast():
    cache = KVCache()
    cache.update(torch.zeros(3, HEADS, 2, HEAD_DIM), torch.zeros(3, HEADS, 2, HEAD_DIM), layer_idx=0)
    with pytest.raises(ValueError, match="do not fit"):
        cache.update(torch.zeros(1, HEADS, 1, HEAD_DIM), torch.zeros(1, HEADS, 1, HEAD_DIM), layer_idx=0)


def test_appending_under_autograd_keeps_the_earlier_steps_backward_valid():
    generator = torch.Generator().manual_seed(4)
    cache = KVCache()
    first = [t.requires_grad_() for t in step(generator, tokens=2)]
    key, _ = cache.update(*first, layer_idx=0)
    early = (key * key).sum()  # saves ``key`` for backward
    second = [t.requires_grad_() for t in step(generator)]
    key, value = cache.update(*second, layer_idx=0)
    (early + key.sum() + value.sum()).backward()
    assert torch.allclose(first[0].grad, 2 * first[0].detach() + 1)
    assert torch.equal(second[1].grad, torch.ones_like(second[1]))


@pytest.mark.parametrize("p,q", [(1, 1), (0, 2)])
def test_decoding_through_caches_that_reallocate_often_matches_unsplit_generate(tiny, p, q):
    model, _ = tiny
    model.generation_config.eos_token_id = None  # random weights: never stop early
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(10, 250, (2, 8), generator=gen)
    pad = torch.tensor([0, 3])
    mask = (torch.arange(8)[None] >= pad[:, None]).long()
    steps = 24
    with torch.no_grad():
        ref = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
        )
        parts = split(model, p, q)
        caches = (KVCache(block=4), KVCache(block=4), KVCache(block=4))  # 8 -> 16 -> 32 tokens of room
        logits = parts(ids, pad, caches)
        tokens, step_logits = [], []
        for _ in range(steps):
            step_logits.append(logits[:, -1])
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
            logits = parts(nxt, pad, caches)
    assert torch.equal(torch.cat(tokens, 1), ref.sequences[:, 8:])
    for ours, theirs in zip(step_logits, ref.logits):
        assert (ours - theirs).abs().max().item() <= 1e-4
    assert all(c.length == 8 + steps for c in caches)
    held = [layer for c in caches for layer in c.layers]
    assert sorted(held) == [0, 1, 2, 3]
    assert all(c.layers[i][0].shape[-2] == 8 + steps for c in caches for i in c.layers)
