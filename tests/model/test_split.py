import pytest
import torch

from fedsplit.model.segments import KVCache, positions_and_mask
from fedsplit.model.split import SplitError, split

N_TINY = 4


def reference_logits(model, ids, mask, positions):
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=positions).logits


@pytest.mark.parametrize("p", [0, 1, 2])
@pytest.mark.parametrize("q", [0, 1, 2])
def test_head_body_tail_logits_equal_unsplit_with_left_padding(tiny, padded_batch, p, q):
    model, _ = tiny
    ids, pad, mask, positions = padded_batch
    ref = reference_logits(model, ids, mask, positions)
    with torch.no_grad():
        out = split(model, p, q)(ids, pad)
    real = mask.bool()
    assert (out - ref)[real].abs().max().item() <= 1e-4


@pytest.mark.parametrize("p,q", [(1, 1), (0, 2), (2, 0), (1, 3)])
def test_body_runs_any_sub_span_of_held_layers(tiny, padded_batch, p, q):
    model, _ = tiny
    ids, pad, mask, positions = padded_batch
    ref = reference_logits(model, ids, mask, positions)
    whole = split(model, 0, 0)  # the body holds every layer, like a server with --layers 0:N
    with torch.no_grad():
        hidden = whole.head(ids, pad)
        for span in [(0, p), (p, N_TINY - q), (N_TINY - q, N_TINY)]:
            hidden = whole.body(hidden, pad, span=span)
        out = whole.tail(hidden, pad)
    assert (out - ref)[mask.bool()].abs().max().item() <= 1e-4


def test_tail_last_only_gives_the_last_positions_logits_with_the_cache_filled(tiny, padded_batch):
    model, _ = tiny
    ids, pad, mask, positions = padded_batch
    ref = reference_logits(model, ids, mask, positions)
    parts = split(model, 1, 2)
    cache = KVCache()
    with torch.no_grad():
        hidden = parts.body(parts.head(ids, pad), pad)
        out = parts.tail(hidden, pad, cache, last_only=True)
    assert out.shape == (ids.shape[0], 1, ref.shape[-1])
    assert (out[:, 0] - ref[:, -1]).abs().max().item() <= 1e-4
    assert cache.length == ids.shape[1]  # every position's keys and values are still cached


def test_span_outside_held_layers_is_refused(tiny, padded_batch):
    model, _ = tiny
    ids, pad, *_ = padded_batch
    parts = split(model, 1, 1)
    hidden = parts.head(ids, pad)
    with pytest.raises(ValueError, match="not inside the held layers"):
        parts.body(hidden, pad, span=(0, 3))


@pytest.mark.parametrize("p,q", [(-1, 0), (0, -2), (3, 2), (5, 0)])
def test_invalid_partition_points_get_clear_error(tiny, p, q):
    model, _ = tiny
    with pytest.raises(SplitError, match="head_layers|tail_layers"):
        split(model, p, q)


def test_mask_is_rebuilt_from_lengths_and_offset():
    positions, mask = positions_and_mask(torch.tensor([2, 0]), q_len=1, offset=4, dtype=torch.float32)
    assert positions.tolist() == [[2], [4]]
    allowed = mask[:, 0, 0] == 0
    assert allowed.tolist() == [[False, False, True, True, True], [True] * 5]


@pytest.mark.parametrize("p,q", [(1, 1), (0, 2), (2, 1)])
def test_incremental_decoding_through_three_caches_matches_unsplit(tiny, p, q):
    model, _ = tiny
    model.generation_config.eos_token_id = None  # random weights: never stop early
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(10, 250, (2, 8), generator=gen)
    pad = torch.tensor([0, 3])
    mask = (torch.arange(8)[None] >= pad[:, None]).long()
    with torch.no_grad():
        ref = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=16,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
        )
        parts = split(model, p, q)
        caches = parts.new_caches()
        logits = parts(ids, pad, caches)
        tokens, step_logits = [], []
        for _ in range(16):
            step_logits.append(logits[:, -1])
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
            logits = parts(nxt, pad, caches)
    assert torch.equal(torch.cat(tokens, 1), ref.sequences[:, 8:])
    for ours, theirs in zip(step_logits, ref.logits):
        assert (ours - theirs).abs().max().item() <= 1e-4
    assert all(c.length == 8 + 16 for c in caches)


def test_kv_cache_keeps_only_its_segments_layers(tiny, padded_batch):
    model, _ = tiny
    ids, pad, *_ = padded_batch
    parts = split(model, 1, 1)
    caches = parts.new_caches()
    with torch.no_grad():
        parts(ids, pad, caches)
    assert [sorted(c.layers) for c in caches] == [[0], [1, 2], [3]]
    assert isinstance(caches[1], KVCache) and caches[1].nbytes() > 0


@pytest.mark.slow
def test_default_model_split_logits_equal_unsplit():
    from fedsplit.model.loading import load_model
    from fedsplit.model.split import load_split

    model, tokenizer = load_model("smollm2-135m")
    batch = tokenizer(["The capital of France is", "Hello"], return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pad = ids.shape[1] - mask.sum(-1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, position_ids=positions).logits
        out = load_split("smollm2-135m", 2, 2)(ids, pad)  # loaded part by part from the checkpoint
    assert (out - ref)[mask.bool()].abs().max().item() <= 1e-4
