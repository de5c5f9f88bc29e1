"""Additive noise on hidden states: Gaussian, Laplace, d_X-privacy."""

import math

import pytest
import torch

from fedsplit.privacy import DXDefense, GaussianDefense, LaplaceDefense, parse_defense


def identity_jacobian(defense, hidden: torch.Tensor) -> bool:
    """Whether d sum(defense(h) * w) / dh == w for a random w."""
    h = hidden.clone().requires_grad_(True)
    w = torch.randn_like(hidden)
    (defense(h) * w).sum().backward()
    return torch.allclose(h.grad, w)


def test_gaussian_absolute_noise_has_the_requested_std(hidden):
    noise = GaussianDefense(0.3)(hidden) - hidden
    assert noise.mean().abs() < 0.01
    assert noise.std().item() == pytest.approx(0.3, rel=0.03)


def test_gaussian_relative_noise_scales_with_each_tokens_rms(hidden):
    noise = GaussianDefense(0.2, relative=True)(hidden) - hidden
    rms = hidden.pow(2).mean(dim=-1, keepdim=True).sqrt()
    standardised = noise / rms
    assert standardised.std().item() == pytest.approx(0.2, rel=0.03)
    # Tokens with 8x the RMS get ~8x the noise.
    low, high = noise[:, :8].std().item(), noise[:, -8:].std().item()
    assert high / low == pytest.approx((rms[:, -8:].mean() / rms[:, :8].mean()).item(), rel=0.15)


@pytest.mark.parametrize("spec", ["gaussian:0.5", "gaussian:0.5:relative", "laplace:0.5", "dx:5"])
def test_additive_noise_has_identity_jacobian(spec, hidden):
    assert identity_jacobian(parse_defense(spec), hidden)


def test_noise_keeps_shape_and_dtype(hidden):
    for defense in (GaussianDefense(0.1, relative=True), LaplaceDefense(0.1), DXDefense(10.0)):
        out = defense(hidden.to(torch.bfloat16))
        assert out.shape == hidden.shape and out.dtype == torch.bfloat16


def test_zero_noise_is_the_identity(hidden):
    assert torch.equal(GaussianDefense(0.0)(hidden), hidden)


def test_laplace_noise_has_the_requested_scale(hidden):
    noise = LaplaceDefense(0.25)(hidden) - hidden
    # Laplace(0, b): E|x| = b, std = sqrt(2) b.
    assert noise.abs().mean().item() == pytest.approx(0.25, rel=0.03)
    assert noise.std().item() == pytest.approx(math.sqrt(2) * 0.25, rel=0.05)


def test_dx_noise_norm_has_mean_h_over_eta():
    torch.manual_seed(0)
    hidden = torch.zeros(64, 32, 48)
    eta = 12.0
    norms = DXDefense(eta)(hidden).norm(dim=-1)
    assert norms.mean().item() == pytest.approx(48 / eta, rel=0.02)
    # Gamma(H, rate eta) has std sqrt(H) / eta.
    assert norms.std().item() == pytest.approx(math.sqrt(48) / eta, rel=0.1)


def test_dx_noise_direction_is_isotropic():
    torch.manual_seed(0)
    noise = DXDefense(1.0)(torch.zeros(20000, 8))
    unit = noise / noise.norm(dim=-1, keepdim=True)
    assert unit.mean(dim=0).abs().max() < 0.03


def test_dx_is_not_an_epsilon_delta_mechanism():
    dx = DXDefense(2.0)
    assert dx.privacy_spent(10) is None
    assert dx.metric_epsilon(10) == 20.0


@pytest.mark.parametrize("spec", ["gaussian:0.1", "gaussian:0.1:relative", "laplace:0.1", "dx:5"])
def test_noise_is_fresh_per_call_and_reproducible_under_manual_seed(spec, hidden):
    defense = parse_defense(spec)
    torch.manual_seed(123)
    a, b = defense(hidden), defense(hidden)
    torch.manual_seed(123)
    assert torch.equal(defense(hidden), a)
    assert not torch.equal(a, b)


def test_noise_applies_in_eval_mode_too(hidden):
    defense = GaussianDefense(0.1).eval()
    assert not torch.equal(defense(hidden), hidden)


def test_noise_defenses_report_no_epsilon():
    for defense in (GaussianDefense(0.1), LaplaceDefense(0.1)):
        assert defense.privacy_spent(100, 0.01) is None
        assert defense.extra_loss() is None
