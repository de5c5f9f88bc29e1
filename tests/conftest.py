"""Shared fixtures: the tiny random Llama built in code (no files, no network)."""

import pytest
import torch

from fedsplit.model.loading import load_model

# The tiny model's matrices are far too small to share between threads: a second intra-op thread
# only adds synchronisation, and when the cores are busy (servers and clients in threads, parallel
# jobs) OpenMP's waiting threads make every op 10-20x slower. Processes that tests spawn keep
# their own setting.
torch.set_num_threads(1)


@pytest.fixture
def tiny():
    """(model, tokenizer) for the tiny random Llama, fp32, eval mode."""
    torch.manual_seed(0)
    model, tokenizer = load_model("tiny-llama")
    return model.eval(), tokenizer


@pytest.fixture
def padded_batch():
    """Three rows left-padded by 0, 3 and 5 tokens: (input_ids, pad_lengths, 2-D mask, position ids)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 250, (3, 11), generator=gen)
    pad = torch.tensor([0, 3, 5])
    mask = (torch.arange(ids.shape[1])[None] >= pad[:, None]).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, pad, mask, positions
