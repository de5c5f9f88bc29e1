"""Compose: order of application, privacy and extra losses of the members."""

import pytest
import torch

from fedsplit.privacy import Compose, DPDefense, GaussianDefense, MIDDefense, SparsifyDefense, parse_defense


class _AddConstant(GaussianDefense):
    """A deterministic stand-in: adds a constant, to make the order of application visible."""

    def __init__(self, value: float) -> None:
        super().__init__(0.0)
        self.value = value

    def forward(self, hidden, pad_lengths=None):
        return hidden + self.value


class _Scale(_AddConstant):
    def forward(self, hidden, pad_lengths=None):
        return hidden * self.value


def test_compose_applies_in_order(hidden):
    add_then_scale = Compose([_AddConstant(1.0), _Scale(3.0)])
    scale_then_add = Compose([_Scale(3.0), _AddConstant(1.0)])
    assert torch.allclose(add_then_scale(hidden), (hidden + 1) * 3)
    assert torch.allclose(scale_then_add(hidden), hidden * 3 + 1)


def test_parsed_composition_matches_manual_chain(hidden):
    composed = parse_defense("sparsify:0.25+gaussian:0.1")
    torch.manual_seed(3)
    out = composed(hidden)
    torch.manual_seed(3)
    expected = GaussianDefense(0.1)(SparsifyDefense(0.25)(hidden))
    assert torch.equal(out, expected)


def test_nested_compose_is_flattened():
    inner = Compose([SparsifyDefense(0.5), GaussianDefense(0.1)])
    outer = Compose([inner, DPDefense(sigma=1.0)])
    assert len(outer.defenses) == 3
    assert outer.name == "sparsify:0.5+gaussian:0.1+dp:clip=1.0,sigma=1.0"


def test_privacy_spent_is_the_best_dp_member_or_none():
    assert Compose([SparsifyDefense(0.5), GaussianDefense(0.1)]).privacy_spent(10) is None
    weak, strong = DPDefense(sigma=0.8), DPDefense(sigma=2.0)
    composed = Compose([SparsifyDefense(0.5), weak, strong])
    assert composed.privacy_spent(100, 0.01) == strong.privacy_spent(100, 0.01)


def test_extra_loss_sums_members_and_parameters_are_visible(hidden):
    composed = Compose([MIDDefense(32, 8, beta=0.1), GaussianDefense(0.1), MIDDefense(32, 4, beta=0.1)])
    assert composed.extra_loss() is None
    composed(hidden)
    first, third = composed.defenses[0].extra_loss(), composed.defenses[2].extra_loss()
    assert composed.extra_loss().item() == pytest.approx((first + third).item())
    assert len(list(composed.parameters())) == 8


def test_empty_compose_is_rejected():
    with pytest.raises(ValueError):
        Compose([])
