"""Fixtures for the attack tests: the tiny random Llama split, short byte-level texts."""

import pytest
import torch

from fedsplit.attacks import encode_texts
from fedsplit.model.split import split

TEXTS = [
    "I feel so happy today, my dog came back.",
    "This movie was awful and boring.",
    "The weather is nice and warm.",
    "We went to the park yesterday.",
    "My boss yelled at me again!",
    "Can you recommend a good book?",
    "I finally passed the driving test",
    "She lost her job last week.",
]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tensors here are tiny: extra threads only add overhead (and stall badly on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def victims(tiny):
    """(tokenizer, input_ids, pad_lengths, score_mask) for TEXTS, left-padded, at most 24 tokens."""
    _, tokenizer = tiny
    ids, pad, score = encode_texts(tokenizer, TEXTS, max_tokens=24)
    return tokenizer, ids, pad, score


@pytest.fixture
def head_of(tiny):
    """``head_of(p)``: the public head with ``p`` blocks of the tiny model."""
    model, _ = tiny
    return lambda p: split(model, p, 0).head
