"""NoPeek: the distance-correlation estimator and the penalty between input embeddings and sent states."""

import logging

import pytest
import torch

import fedsplit.privacy.nopeek as nopeek_module
from fedsplit.privacy import (
    Compose,
    DefenseConfig,
    GaussianDefense,
    NoPeekDefense,
    distance_correlation_sq,
    parse_defense,
)


def _batch(b=3, t=12, e=6, h=10, pads=(0, 3, 7)):
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (b, t))
    embeds = torch.randn(b, t, e)
    # states that depend on the input, as a head's do (an independent sample has no penalty to follow)
    hidden = (embeds @ torch.randn(e, h) + 0.1 * torch.randn(b, t, h)).requires_grad_(True)
    return ids, embeds, hidden, torch.tensor(pads)


@pytest.mark.parametrize("dim", [1, 8, 128])
def test_distance_correlation_is_about_zero_for_independent_samples(dim):
    torch.manual_seed(dim)
    x, y = torch.randn(400, dim), torch.randn(400, dim)
    assert abs(distance_correlation_sq(x, y).item()) < 0.02


def test_distance_correlation_is_one_for_linearly_related_samples():
    torch.manual_seed(0)
    x = torch.randn(200, 5)
    rotation, _ = torch.linalg.qr(torch.randn(5, 5))
    for y in (3.0 * x + 1.0, -0.5 * x @ rotation + 2.0):
        assert distance_correlation_sq(x, y).item() == pytest.approx(1.0, abs=1e-4)
        assert distance_correlation_sq(x, y, bias_corrected=False).item() == pytest.approx(1.0, abs=1e-4)
    assert distance_correlation_sq(x[:, :1], x[:, :1] ** 2).item() > 0.1  # dependent, not linear


def test_the_classical_estimator_is_biased_upwards_in_high_dimension_and_the_corrected_one_is_not():
    torch.manual_seed(1)
    x, y = torch.randn(128, 256), torch.randn(128, 256)
    assert distance_correlation_sq(x, y, bias_corrected=False).item() > 0.5
    assert distance_correlation_sq(x, y).item() < 0.05


def test_distance_correlation_rejects_unpaired_or_too_few_rows():
    with pytest.raises(ValueError, match="paired"):
        distance_correlation_sq(torch.randn(5, 2), torch.randn(6, 2))
    with pytest.raises(ValueError, match="at least 4"):
        distance_correlation_sq(torch.randn(3, 2), torch.randn(3, 2))


def test_nopeek_is_the_identity_on_the_states_and_its_penalty_is_weight_times_dcor_over_real_positions():
    ids, embeds, hidden, pad = _batch()
    defense = NoPeekDefense(weight=0.7)
    defense.observe_inputs(ids, embeds, pad)
    out = defense(hidden, pad)
    assert out is hidden
    assert defense.extra_loss().item() > 0.1
    real = torch.arange(12).unsqueeze(0) >= pad.unsqueeze(1)
    expected = 0.7 * distance_correlation_sq(embeds[real], hidden[real])
    assert defense.extra_loss().item() == pytest.approx(expected.item(), rel=1e-6)


def test_the_penalty_gradient_reaches_the_sent_states_at_real_positions_only():
    ids, embeds, hidden, pad = _batch()
    embeds.requires_grad_(True)
    defense = NoPeekDefense(weight=1.0)
    defense.observe_inputs(ids, embeds, pad)
    defense(hidden, pad)
    defense.extra_loss().backward()
    assert hidden.grad[2, 7:].abs().sum() > 0
    assert hidden.grad[2, :7].abs().sum() == 0 and hidden.grad[1, :3].abs().sum() == 0
    assert embeds.grad is None  # the embedding table is not what NoPeek trains


def test_minimising_the_penalty_makes_the_sent_states_less_dependent_on_the_input():
    torch.manual_seed(0)
    x = torch.randn(1, 256, 8)
    head = torch.nn.Linear(8, 8)
    defense = NoPeekDefense(weight=1.0, positions=256)
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        defense.observe_inputs(torch.zeros(1, 256, dtype=torch.long), x)
        defense(head(x))
        loss = defense.extra_loss()
        losses.append(loss.item())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert losses[-1] < 0.6 * losses[0]


def test_at_most_positions_rows_enter_the_penalty(monkeypatch):
    seen = []

    def spy(x, y, bias_corrected=True):
        seen.append((x.shape[0], y.shape[0]))
        return distance_correlation_sq(x, y, bias_corrected)

    monkeypatch.setattr(nopeek_module, "distance_correlation_sq", spy)
    ids, embeds, hidden, pad = _batch()
    defense = NoPeekDefense(weight=1.0, positions=8)
    defense.observe_inputs(ids, embeds, pad)
    defense(hidden, pad)
    assert seen == [(8, 8)]


def test_no_penalty_without_grad_and_a_warning_without_observed_inputs(caplog):
    ids, embeds, hidden, pad = _batch()
    defense = NoPeekDefense(weight=1.0)
    defense.observe_inputs(ids, embeds, pad)
    with torch.no_grad():
        defense(hidden, pad)
    assert defense.extra_loss() is None
    with caplog.at_level(logging.WARNING, logger="fedsplit.privacy.nopeek"):
        defense(hidden, pad)  # the inputs were used up by the previous forward
    assert defense.extra_loss() is None
    assert "observe_inputs" in caplog.text


def test_observed_inputs_of_another_batch_are_refused():
    ids, embeds, hidden, pad = _batch()
    defense = NoPeekDefense(weight=1.0)
    defense.observe_inputs(ids[:2], embeds[:2], pad[:2])
    with pytest.raises(ValueError, match="same batch"):
        defense(hidden, pad)


def test_compose_passes_the_observed_inputs_to_its_members():
    ids, embeds, hidden, pad = _batch()
    chain = Compose([NoPeekDefense(weight=0.5), GaussianDefense(0.1)])
    chain.observe_inputs(ids, embeds, pad)
    out = chain(hidden, pad)
    assert chain.extra_loss() is not None and chain.extra_loss().requires_grad
    assert out.shape == hidden.shape and not torch.equal(out, hidden)


@pytest.mark.parametrize("spec", ["nopeek:0.5", "nopeek:0.5,positions=64", "nopeek:1+gaussian:0.1:relative"])
def test_nopeek_specs_parse_and_round_trip(spec):
    defense = parse_defense(spec)
    assert parse_defense(defense.name).name == defense.name
    member = defense.defenses[0] if isinstance(defense, Compose) else defense
    assert isinstance(member, NoPeekDefense)
    assert DefenseConfig(defense=spec).build_defense().name == defense.name


def test_nopeek_spec_values_land_in_the_defense():
    defense = parse_defense("nopeek:0.25,positions=64")
    assert (defense.weight, defense.positions, defense.name) == (0.25, 64, "nopeek:0.25,positions=64")


@pytest.mark.parametrize(
    "spec,hint",
    [
        ("nopeek", "needs parameters"),
        ("nopeek:x", "must be a number"),
        ("nopeek:0.1,size=3", "keys: positions"),
        ("nopeek:0.1,positions=2", ">= 4"),
        ("nopeek:-1", ">= 0"),
    ],
)
def test_bad_nopeek_specs_say_what_is_wrong(spec, hint):
    with pytest.raises(ValueError, match="Valid defence specs") as info:
        parse_defense(spec)
    assert hint in str(info.value)
