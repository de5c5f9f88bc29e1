"""Gaussian noise on the gradient copy sent to the server."""

import pytest
import torch

from fedsplit.privacy import GaussianGradDefense


def test_noise_changes_the_copy_and_leaves_the_original_untouched():
    torch.manual_seed(0)
    grad = torch.randn(4, 16, 32)
    before = grad.clone()
    sent = GaussianGradDefense(0.01)(grad)
    assert sent is not grad
    assert not torch.equal(sent, grad)
    assert torch.equal(grad, before)


def test_absolute_noise_has_the_requested_std():
    torch.manual_seed(0)
    grad = torch.randn(8, 64, 32) * 1e-3
    noise = GaussianGradDefense(0.02)(grad) - grad
    assert noise.std().item() == pytest.approx(0.02, rel=0.03)


def test_relative_noise_is_scaled_by_the_largest_token_gradient_norm():
    torch.manual_seed(0)
    # Rows with very different gradient norms get the same noise scale, and near-zero positions
    # (most of an answer-only gradient) do not dilute it.
    grad = torch.randn(8, 64, 32) * torch.tensor([1e-3, 1.0] * 4).view(8, 1, 1)
    grad[:, :60] = 0
    noise = GaussianGradDefense(0.1, relative=True)(grad) - grad
    largest = grad.norm(dim=-1).max().item()
    assert noise.std().item() == pytest.approx(0.1 * largest, rel=0.03)
    assert noise[0].std().item() == pytest.approx(noise[1].std().item(), rel=0.1)


def test_grad_defense_does_not_track_autograd():
    grad = torch.randn(2, 3, 4, requires_grad=True)
    sent = GaussianGradDefense(0.1)(grad)
    assert not sent.requires_grad


def test_grad_noise_is_reproducible_under_manual_seed():
    grad = torch.ones(2, 3, 4)
    defense = GaussianGradDefense(0.1, relative=True)
    torch.manual_seed(5)
    a = defense(grad)
    torch.manual_seed(5)
    assert torch.equal(defense(grad), a)
