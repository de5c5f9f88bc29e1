"""bypass: the chain records ``sent - clean`` so that the client can cancel it in its residual stream."""

import pytest
import torch

from fedsplit.privacy import BypassDefense, Compose, GaussianDefense, SparsifyDefense, parse_defense


def test_the_correction_is_what_the_chain_added_and_carries_no_grad(hidden):
    chain = parse_defense("gaussian:0.5+bypass")
    clean = hidden.clone().requires_grad_(True)
    sent = chain(clean)
    correction = chain.residual_correction()
    assert torch.equal(correction, (sent - clean).detach())
    assert not correction.requires_grad and correction.abs().sum() > 0
    # the client's tail reads body_out - correction: with an identity body, the clean states
    assert torch.allclose(sent - correction, clean, atol=1e-6)


def test_the_correction_follows_each_forward(hidden):
    chain = Compose([SparsifyDefense(0.5), BypassDefense()])
    chain(hidden)
    first = chain.residual_correction()
    chain(hidden[:2])
    assert chain.residual_correction().shape == hidden[:2].shape
    assert torch.equal(first, SparsifyDefense(0.5)(hidden) - hidden)


def test_without_bypass_or_alone_there_is_no_correction(hidden):
    chain = Compose([GaussianDefense(0.5)])
    chain(hidden)
    assert chain.residual_correction() is None
    alone = parse_defense("bypass")
    assert isinstance(alone, BypassDefense) and alone(hidden) is hidden
    assert alone.residual_correction() is None and alone.privacy_spent(1) is None


@pytest.mark.parametrize("spec", ["bypass", "gaussian:0.1:relative+bypass", "sparsify:0.5+dx:40+bypass"])
def test_bypass_specs_round_trip(spec):
    assert parse_defense(parse_defense(spec).name).name == parse_defense(spec).name


@pytest.mark.parametrize(
    "spec,hint",
    [
        ("bypass+gaussian:0.1", "bypass must come last"),
        ("bypass:1", "no parameters"),
        ("bypass+bypass", "once"),
    ],
)
def test_bad_bypass_specs_say_what_is_wrong(spec, hint):
    with pytest.raises(ValueError, match="Valid defence specs") as info:
        parse_defense(spec)
    assert hint in str(info.value)
