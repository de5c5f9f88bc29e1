"""Top-k sparsification of each token vector."""

import pytest
import torch

from fedsplit.privacy import SparsifyDefense


@pytest.mark.parametrize("fraction,k", [(0.1, 3), (0.25, 8), (1.0, 32), (0.001, 1)])
def test_keeps_exactly_k_entries_per_token(fraction, k, hidden):
    defense = SparsifyDefense(fraction)
    assert defense.num_kept(32) == k
    out = defense(hidden)
    assert ((out != 0).sum(dim=-1) == k).all()


def test_kept_entries_are_the_largest_magnitudes_and_unchanged(hidden):
    out = SparsifyDefense(0.25)(hidden)
    kept = out != 0
    assert torch.equal(out[kept], hidden[kept])
    smallest_kept = hidden.abs().masked_fill(~kept, float("inf")).min(dim=-1).values
    largest_dropped = hidden.abs().masked_fill(kept, 0.0).max(dim=-1).values
    assert (smallest_kept >= largest_dropped).all()


def test_gradient_is_the_mask(hidden):
    defense = SparsifyDefense(0.1)
    h = hidden.clone().requires_grad_(True)
    defense(h).sum().backward()
    assert torch.equal(h.grad, defense.mask(hidden))


def test_sparsify_is_deterministic_and_not_dp(hidden):
    defense = SparsifyDefense(0.5)
    assert torch.equal(defense(hidden), defense(hidden))
    assert defense.privacy_spent(10) is None
