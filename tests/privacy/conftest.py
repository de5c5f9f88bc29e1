"""Shared fixtures for the defence tests: plain tensors, no model."""

import pytest
import torch


@pytest.fixture
def hidden() -> torch.Tensor:
    """A batch of hidden states [B=4, T=64, H=32] with per-token scales that differ."""
    torch.manual_seed(0)
    scale = torch.linspace(0.5, 4.0, 64).view(1, 64, 1)
    return torch.randn(4, 64, 32) * scale
