"""Adversarial training: the gradient-reversal layer, the adapter and the simulated inverter."""

import logging

import pytest
import torch
import torch.nn.functional as F

from fedsplit.privacy import AdversarialDefense, Compose, GaussianDefense, grad_reverse, parse_defense

HIDDEN = 16


def _batch():
    torch.manual_seed(0)
    ids = torch.randint(0, 40, (3, 10))
    hidden = torch.randn(3, 10, HIDDEN, requires_grad=True)
    pad = torch.tensor([0, 2, 6])
    real = torch.arange(10).unsqueeze(0) >= pad.unsqueeze(1)
    return ids, hidden, pad, real


def _defense(**kwargs):
    torch.manual_seed(1)
    return AdversarialDefense(
        HIDDEN, kwargs.pop("weight", 0.5), rank=4, buckets=kwargs.pop("buckets", 7), **kwargs
    )


@pytest.mark.parametrize("scale", [0.0, 0.3, 2.0])
def test_gradient_reversal_is_the_identity_forward_and_negates_and_scales_the_gradient(scale):
    x = torch.randn(4, 5, requires_grad=True)
    upstream = torch.randn(4, 5)
    y = grad_reverse(x, scale)
    assert torch.equal(y, x)
    (y * upstream).sum().backward()
    assert torch.equal(x.grad, -scale * upstream)


def test_a_fresh_adapter_sends_exactly_what_the_head_computed():
    ids, hidden, pad, _ = _batch()
    defense = _defense()
    defense.observe_inputs(ids, None, pad)
    assert torch.equal(defense(hidden, pad), hidden)


def test_the_inverter_learns_while_the_states_get_the_negated_scaled_gradient():
    ids, hidden, pad, real = _batch()
    defense = _defense(weight=0.5)
    defense.observe_inputs(ids, None, pad)
    defense(hidden, pad)
    loss = defense.extra_loss()
    assert loss.item() == pytest.approx(
        F.cross_entropy(defense.inverter(hidden[real]), ids[real] % 7).item(), rel=1e-6
    )
    loss.backward()
    # what the states would get from the plain cross-entropy (no reversal)
    plain = hidden.detach().clone().requires_grad_(True)
    F.cross_entropy(defense.inverter(plain[real]), ids[real] % 7).backward()
    assert torch.allclose(hidden.grad, -0.5 * plain.grad, atol=1e-7)
    assert hidden.grad[2, :6].abs().sum() == 0  # pad positions do not train anyone
    # one step down the inverter's own gradient lowers its cross-entropy ...
    with torch.no_grad():
        before = defense.inversion_loss(hidden, ids, real).item()
        for p in defense.inverter.parameters():
            p -= 0.1 * p.grad
        assert defense.inversion_loss(hidden, ids, real).item() < before


def test_a_step_down_the_adapters_gradient_makes_inversion_harder():
    ids, hidden, pad, real = _batch()
    defense = _defense(weight=1.0)
    defense.observe_inputs(ids, None, pad)
    defense(hidden.detach(), pad)
    defense.extra_loss().backward()
    assert defense.adapter_up.weight.grad.abs().sum() > 0
    with torch.no_grad():
        before = defense.inversion_loss(defense.adapt(hidden), ids, real).item()
        defense.adapter_up.weight -= 0.5 * defense.adapter_up.weight.grad
        assert defense.inversion_loss(defense.adapt(hidden), ids, real).item() > before


def test_noise_after_the_adapter_is_relative_and_keeps_the_identity_jacobian():
    ids, hidden, pad, _ = _batch()
    defense = _defense(noise=0.5)
    out = defense(hidden, pad)
    ratio = ((out - hidden).pow(2).mean(-1).sqrt() / hidden.pow(2).mean(-1).sqrt()).mean()
    assert ratio.item() == pytest.approx(0.5, rel=0.15)
    out.sum().backward()
    assert torch.allclose(hidden.grad, torch.ones_like(hidden))


def test_lambda_ramps_up_over_the_warmup_training_forwards_only():
    ids, hidden, pad, _ = _batch()
    defense = _defense(weight=1.0, warmup=4)
    weights = []
    for _ in range(5):
        weights.append(defense.current_weight())
        defense.observe_inputs(ids, None, pad)
        defense(hidden, pad)
    assert weights == [0.25, 0.5, 0.75, 1.0, 1.0]
    defense.eval()
    defense.observe_inputs(ids, None, pad)
    defense(hidden, pad)
    assert int(defense.forwards) == 5
    assert "forwards" in defense.state_dict()  # checkpoints keep the warm-up's progress


def test_no_inverter_term_without_grad_or_observed_ids(caplog):
    ids, hidden, pad, _ = _batch()
    defense = _defense()
    defense.observe_inputs(ids, None, pad)
    with torch.no_grad():
        defense(hidden, pad)
    assert defense.extra_loss() is None
    with caplog.at_level(logging.WARNING, logger="fedsplit.privacy.adversarial"):
        defense(hidden, pad)
    assert defense.extra_loss() is None and "observe_inputs" in caplog.text


def test_parameters_are_the_adapter_and_the_inverter_for_the_clients_optimiser():
    defense = AdversarialDefense(HIDDEN, 0.1, rank=4, buckets=7)
    shapes = sorted(tuple(p.shape) for p in defense.parameters())
    assert shapes == sorted([(4, HIDDEN), (HIDDEN, 4), (7, HIDDEN), (7,)])
    assert torch.count_nonzero(defense.adapter_up.weight) == 0
    assert defense.privacy_spent(10) is None


def test_compose_passes_ids_to_the_adversarial_member():
    ids, hidden, pad, _ = _batch()
    chain = Compose([_defense(), GaussianDefense(0.1)])
    chain.observe_inputs(ids, None, pad)
    chain(hidden, pad)
    assert chain.extra_loss() is not None


@pytest.mark.parametrize(
    "spec",
    ["adv:0.5", "adv:0.5,rank=8,buckets=128", "adv:1,noise=0.25,warmup=100,positions=64", "adv:0.1+dx:50"],
)
def test_adv_specs_parse_and_round_trip(spec):
    defense = parse_defense(spec, hidden_size=HIDDEN)
    assert parse_defense(defense.name, hidden_size=HIDDEN).name == defense.name
    member = defense.defenses[0] if isinstance(defense, Compose) else defense
    assert isinstance(member, AdversarialDefense)


def test_adv_spec_values_land_in_the_defense_and_defaults_stay_out_of_the_name():
    defense = parse_defense("adv:0.5,rank=8,noise=0.25,warmup=10", hidden_size=HIDDEN)
    assert (defense.weight, defense.rank, defense.buckets, defense.noise, defense.warmup) == (
        0.5,
        8,
        4096,
        0.25,
        10,
    )
    assert defense.name == "adv:0.5,rank=8,noise=0.25,warmup=10"
    assert parse_defense("adv:0.5,rank=64", hidden_size=HIDDEN).name == "adv:0.5"


@pytest.mark.parametrize(
    "spec,hint",
    [
        ("adv", "needs parameters"),
        ("adv:rank=3", "starts with its weight"),
        ("adv:0.1,depth=3", "keys: rank, buckets, noise, warmup, positions"),
        ("adv:0.1,rank=2.5", "integer"),
        ("adv:0.1,rank=4,rank=5", "given twice"),
        ("adv:0.1,buckets=1", "buckets >= 2"),
    ],
)
def test_bad_adv_specs_say_what_is_wrong(spec, hint):
    with pytest.raises(ValueError, match="Valid defence specs") as info:
        parse_defense(spec, hidden_size=HIDDEN)
    assert hint in str(info.value)


def test_adv_without_hidden_size_asks_for_it():
    with pytest.raises(ValueError, match="hidden_size"):
        parse_defense("adv:0.1")
