"""Per-token clipping + Gaussian mechanism, and its accounting through dp_accounting."""

import math

import pytest
import torch

from fedsplit.privacy import DPDefense, calibrate_noise_multiplier, clip_tokens, gaussian_epsilon


def test_clipping_bounds_every_tokens_norm_before_noise(hidden):
    out = DPDefense(clip=1.5, sigma=0.0)(hidden)
    norms = out.norm(dim=-1)
    assert norms.max().item() <= 1.5 * (1 + 1e-5)
    # Tokens already inside the ball are untouched.
    small = hidden.norm(dim=-1) <= 1.5
    assert torch.equal(out[small], hidden[small])


def test_clipping_keeps_direction(hidden):
    out = clip_tokens(hidden, 1.0)
    cosine = torch.nn.functional.cosine_similarity(out, hidden, dim=-1)
    assert torch.allclose(cosine, torch.ones_like(cosine), atol=1e-5)


def test_noise_std_is_sigma_times_clip(hidden):
    defense = DPDefense(clip=2.0, sigma=0.5)
    noise = defense(hidden) - clip_tokens(hidden, 2.0)
    assert noise.std().item() == pytest.approx(1.0, rel=0.03)


def test_gradient_flows_through_clipping_and_noise_is_additive(hidden):
    torch.manual_seed(0)
    h = hidden.clone().requires_grad_(True)
    w = torch.randn_like(hidden)
    (DPDefense(clip=1.0, sigma=0.7)(h) * w).sum().backward()
    h_ref = hidden.clone().requires_grad_(True)
    (clip_tokens(h_ref, 1.0) * w).sum().backward()
    assert torch.allclose(h.grad, h_ref.grad)


def test_epsilon_grows_with_steps():
    dp = DPDefense(clip=1.0, sigma=1.0)
    eps = [dp.privacy_spent(steps, sample_rate=0.01, delta=1e-5)[0] for steps in (10, 100, 1000, 10000)]
    assert eps == sorted(eps) and len(set(eps)) == len(eps)


def test_epsilon_shrinks_with_larger_sigma():
    eps = [
        DPDefense(sigma=s).privacy_spent(1000, sample_rate=0.01, delta=1e-5)[0] for s in (0.6, 1.0, 2.0, 4.0)
    ]
    assert eps == sorted(eps, reverse=True) and len(set(eps)) == len(eps)


def test_privacy_spent_returns_epsilon_and_delta():
    epsilon, delta = DPDefense(sigma=1.0).privacy_spent(1000, sample_rate=0.01, delta=1e-5)
    assert delta == 1e-5
    # DP-SGD reference point (sigma=1, q=0.01, 1000 steps): epsilon is about 2 with RDP.
    assert 1.0 < epsilon < 3.0


def test_subsampling_amplifies_privacy():
    dp = DPDefense(sigma=1.0)
    assert dp.privacy_spent(100, sample_rate=0.01)[0] < dp.privacy_spent(100, sample_rate=1.0)[0]


def test_zero_steps_and_zero_noise_edge_cases():
    assert DPDefense(sigma=1.0).privacy_spent(0)[0] == 0.0
    assert math.isinf(DPDefense(sigma=0.0).privacy_spent(10)[0])


def test_replace_neighbouring_is_stricter_than_add_remove():
    add_remove = DPDefense(sigma=1.0).epsilon_per_release(1e-5)
    replace = DPDefense(sigma=1.0, neighbouring="replace").epsilon_per_release(1e-5)
    assert replace > add_remove
    # One release under replace-one is the Gaussian mechanism with twice the sensitivity.
    assert replace == pytest.approx(DPDefense(sigma=0.5).epsilon_per_release(1e-5))
    assert DPDefense(sigma=1.0, neighbouring="replace").privacy_spent(1)[0] == pytest.approx(
        replace, rel=1e-3
    )


def test_one_step_without_sampling_matches_the_analytic_gaussian_bound():
    # RDP is a valid but looser bound than the analytic Gaussian mechanism.
    dp = DPDefense(sigma=1.0, accountant="pld")
    assert dp.privacy_spent(1)[0] == pytest.approx(dp.epsilon_per_release(1e-5), rel=1e-3)
    assert DPDefense(sigma=1.0).privacy_spent(1)[0] >= dp.epsilon_per_release(1e-5)


def test_calibration_meets_the_target_over_a_run():
    sigma = calibrate_noise_multiplier(3.0, delta=1e-5, steps=100, sample_rate=0.05)
    assert gaussian_epsilon(sigma, 100, 0.05, 1e-5) <= 3.0
    assert gaussian_epsilon(sigma * 0.97, 100, 0.05, 1e-5) > 3.0


@pytest.mark.parametrize(
    "kwargs", [{"sample_rate": 0.0}, {"sample_rate": 1.5}, {"delta": 0.0}, {"delta": 1.0}, {"steps": -1}]
)
def test_privacy_spent_rejects_bad_arguments(kwargs):
    args = {"steps": 10, "sample_rate": 0.1, "delta": 1e-5} | kwargs
    with pytest.raises(ValueError):
        DPDefense(sigma=1.0).privacy_spent(**args)


def test_dp_noise_is_reproducible_under_manual_seed(hidden):
    dp = DPDefense(clip=1.0, sigma=0.5)
    torch.manual_seed(7)
    a = dp(hidden)
    torch.manual_seed(7)
    assert torch.equal(dp(hidden), a)
