"""Text specs: every documented form parses, round-trips through ``name``, and bad ones fail helpfully."""

import dataclasses

import pytest

from fedsplit.privacy import (
    DEFENSE_SPEC_HELP,
    Compose,
    DefenseConfig,
    DPDefense,
    DXDefense,
    GaussianDefense,
    GaussianGradDefense,
    LaplaceDefense,
    MIDDefense,
    SparsifyDefense,
    parse_defense,
    parse_grad_defense,
)

HIDDEN = 32

FORMS = [
    ("gaussian:0.05", GaussianDefense),
    ("gaussian:0.05:relative", GaussianDefense),
    ("gaussian:0.05:absolute", GaussianDefense),
    ("laplace:0.1", LaplaceDefense),
    ("laplace:0.1:relative", LaplaceDefense),
    ("dp:clip=1.0,sigma=0.5", DPDefense),
    ("dp:0.5", DPDefense),
    ("dp:0.5,clip=2", DPDefense),
    ("dp:clip=1.0,sigma=0.5,neighbouring=replace", DPDefense),
    ("dp:clip=1.0,sigma=0.5,accountant=pld", DPDefense),
    ("dp:clip=1.0,epsilon=8", DPDefense),
    ("dx:10", DXDefense),
    ("sparsify:0.1", SparsifyDefense),
    ("mid:16", MIDDefense),
    ("mid:16,0.01", MIDDefense),
    ("sparsify:0.2+gaussian:0.05", Compose),
    (" Gaussian:0.05 + dp:clip=1,sigma=1 ", Compose),
]


@pytest.mark.parametrize("spec,cls", FORMS)
def test_every_form_parses_and_round_trips_through_name(spec, cls):
    defense = parse_defense(spec, hidden_size=HIDDEN)
    assert isinstance(defense, cls)
    again = parse_defense(defense.name, hidden_size=HIDDEN)
    assert type(again) is type(defense)
    assert again.name == defense.name


@pytest.mark.parametrize("spec", [None, "", "none", " None "])
def test_none_spec_means_no_defense(spec):
    assert parse_defense(spec) is None
    assert parse_grad_defense(spec) is None


def test_parsed_values_land_in_the_defense():
    g = parse_defense("gaussian:0.05:relative")
    assert (g.std, g.relative) == (0.05, True)
    d = parse_defense("dp:clip=2.5,sigma=0.3")
    assert (d.clip, d.sigma, d.neighbouring) == (2.5, 0.3, "add_remove")
    assert parse_defense("dp:0.7").clip == 1.0
    m = parse_defense("mid:8", hidden_size=HIDDEN)
    assert (m.hidden_size, m.bottleneck_dim, m.beta) == (HIDDEN, 8, 1e-3)
    c = parse_defense("sparsify:0.2+gaussian:0.05")
    assert [type(x) for x in c.defenses] == [SparsifyDefense, GaussianDefense]


def test_dp_epsilon_spec_calibrates_sigma_to_the_target():
    d = parse_defense("dp:clip=1.0,epsilon=4,delta=1e-5")
    assert d.epsilon_per_release(1e-5) == pytest.approx(4.0, rel=1e-3)


BAD = [
    ("gaussian", "needs parameters"),
    ("gaussian:abc", "must be a number"),
    ("gaussian:-1", ">= 0"),
    ("gaussian:0.1:loud", "relative"),
    ("laplace:nan", "finite"),
    ("foo:1", "unknown defence"),
    ("dp:clip=1", "exactly one of sigma"),
    ("dp:sigma=1,epsilon=2", "exactly one of sigma"),
    ("dp:sigma=1,steps=10", "only apply with epsilon"),
    ("dp:sigma=1,colour=red", "unknown dp key"),
    ("dp:sigma=1,neighbouring=swap", "neighbouring"),
    ("dp:clip=0,sigma=1", "clip"),
    ("dx:0", "> 0"),
    ("sparsify:1.5", "(0, 1]"),
    ("sparsify:0", "> 0"),
    ("mid:abc", "integer"),
    ("mid:16,0.1,3", "mid:D[,BETA]"),
    ("gaussian:0.1+", "stray '+'"),
    ("none+gaussian:0.1", "'none' cannot be combined"),
]


@pytest.mark.parametrize("spec,hint", BAD)
def test_bad_spec_raises_value_error_listing_valid_forms(spec, hint):
    with pytest.raises(ValueError) as info:
        parse_defense(spec, hidden_size=HIDDEN)
    message = str(info.value)
    assert repr(spec) in message
    assert hint in message
    assert DEFENSE_SPEC_HELP in message


def test_mid_without_hidden_size_asks_for_it():
    with pytest.raises(ValueError, match="hidden_size"):
        parse_defense("mid:16")


def test_grad_specs_parse_and_round_trip():
    g = parse_grad_defense("gaussian:0.01")
    assert isinstance(g, GaussianGradDefense) and (g.std, g.relative) == (0.01, False)
    r = parse_grad_defense("gaussian:0.1:relative")
    assert r.relative and parse_grad_defense(r.name).name == r.name


@pytest.mark.parametrize("spec", ["laplace:0.1", "gaussian", "gaussian:x", "gaussian:0.1:sideways"])
def test_bad_grad_spec_lists_valid_forms(spec):
    with pytest.raises(ValueError, match="Valid gradient-defence specs"):
        parse_grad_defense(spec)


def test_defense_config_fields_have_help_and_build_defenses():
    for f in dataclasses.fields(DefenseConfig):
        assert f.metadata.get("help")
    config = DefenseConfig(defense="mid:4+gaussian:0.1", grad_defense="gaussian:0.01")
    assert config.build_defense(hidden_size=HIDDEN).name == "mid:4,0.001+gaussian:0.1"
    assert config.build_grad_defense().name == "gaussian:0.01"
    assert DefenseConfig().build_defense() is None


def test_defense_config_rejects_bad_spec_at_construction():
    with pytest.raises(ValueError, match="Valid defence specs"):
        DefenseConfig(defense="gausian:0.1")
    with pytest.raises(ValueError, match="Valid gradient-defence specs"):
        DefenseConfig(grad_defense="gaussian:big")
