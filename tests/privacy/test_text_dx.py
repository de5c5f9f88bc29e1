"""Text-level d_chi-privacy: token replacement by embedding-space neighbours, before the head."""

import math

import pytest
import torch

from fedsplit.privacy import (
    Compose,
    DefenseConfig,
    GaussianDefense,
    TextDX,
    TokenDefense,
    parse_defense,
    parse_defense_items,
)


@pytest.fixture
def embedding() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(200, 8)


@pytest.fixture
def line() -> torch.Tensor:
    """Five tokens on a line at 0, 1, 2, 3 and 5: distances are easy to read."""
    return torch.tensor([[0.0], [1.0], [2.0], [3.0], [5.0]])


def _ids(vocab=200, shape=(4, 50), seed=1):
    return torch.randint(5, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k", [0, 10])
def test_a_huge_epsilon_keeps_every_token(embedding, k):
    ids = _ids()
    assert torch.equal(TextDX(embedding, 1e6, k=k).perturb(ids), ids)


@pytest.mark.parametrize("k", [0, 10])
def test_a_small_epsilon_replaces_most_tokens(embedding, k):
    ids = _ids()
    replaced = (TextDX(embedding, 1e-3, k=k, seed=0).perturb(ids) != ids).float().mean().item()
    assert replaced > 1 - 2 / (k or 200)  # about (C-1)/C for C near-uniform candidates


@pytest.mark.parametrize("k", [0, 10])
def test_pad_positions_and_protected_ids_are_kept_and_protected_ids_never_chosen(embedding, k):
    ids = _ids()
    ids[:, 10] = 1  # e.g. a BOS in every row
    pad = torch.tensor([0, 5, 20, 49])
    out = TextDX(embedding, 1e-3, k=k, seed=0, keep_ids=[0, 1, 2]).perturb(ids, pad)
    for row, n in enumerate(pad.tolist()):
        assert torch.equal(out[row, :n], ids[row, :n])
    assert torch.equal(out[:, 10], ids[:, 10])
    real = torch.arange(50).unsqueeze(0) >= pad.unsqueeze(1)
    real[:, 10] = False
    assert not torch.isin(out[real], torch.tensor([0, 1, 2])).any()
    assert (out[real] != ids[real]).float().mean() > 0.8


def test_a_decoding_step_after_the_pads_is_perturbed(embedding):
    step = _ids(shape=(4, 1))
    pad = torch.tensor([0, 5, 20, 49])
    defense = TextDX(embedding, 1e-3, seed=0)
    assert torch.equal(defense.perturb(step, pad, offset=0)[1:], step[1:])  # still inside the pads
    assert (defense.perturb(step, pad, offset=60) != step).any()


@pytest.mark.parametrize("k", [0, 10])
def test_a_seed_makes_the_replacements_reproducible(embedding, k):
    ids = _ids()
    a = TextDX(embedding, 2.0, k=k, seed=7).perturb(ids)
    assert torch.equal(TextDX(embedding, 2.0, k=k, seed=7).perturb(ids), a)
    assert not torch.equal(TextDX(embedding, 2.0, k=k, seed=8).perturb(ids), a)
    unseeded = TextDX(embedding, 2.0, k=k)
    torch.manual_seed(3)
    b = unseeded.perturb(ids)
    torch.manual_seed(3)
    assert torch.equal(unseeded.perturb(ids), b)


def test_replacement_frequencies_follow_exp_minus_half_epsilon_distance(line):
    epsilon = 2.0
    out = TextDX(line, epsilon, seed=0).perturb(torch.zeros(1, 200_000, dtype=torch.long))
    counts = torch.bincount(out.flatten(), minlength=5).double()
    distances = line[:, 0].double()  # from token 0
    expected = torch.exp(-epsilon / 2 * distances)
    assert torch.allclose(counts / counts[0], expected, rtol=0.06)


def test_with_k_candidates_only_the_k_nearest_are_drawn_in_the_same_ratios(line):
    out = TextDX(line, 2.0, k=3, seed=0).perturb(torch.full((1, 100_000), 1, dtype=torch.long))
    counts = torch.bincount(out.flatten(), minlength=5).double()
    assert counts[3] == 0 and counts[4] == 0  # token 1's nearest three are 0, 1 and 2
    assert counts[0] / counts[1] == pytest.approx(math.exp(-1.0), rel=0.05)
    assert counts[2] / counts[0] == pytest.approx(1.0, rel=0.05)


def test_the_dchi_guarantee_bounds_every_output_ratio_on_the_toy_embedding(line):
    """P(y|x) <= exp(eps * d(x, x')) P(y|x'): checked on the empirical frequencies, with slack."""
    epsilon, n = 1.0, 100_000
    defense = TextDX(line, epsilon, seed=0)
    freq = torch.stack(
        [
            torch.bincount(defense.perturb(torch.full((1, n), x)).flatten(), minlength=5).double() / n
            for x in range(5)
        ]
    )
    coords = line[:, 0].double()
    for x in range(5):
        for x2 in range(5):
            bound = torch.exp(epsilon * (coords[x] - coords[x2]).abs())
            assert (freq[x] <= bound * freq[x2] * 1.15 + 2e-3).all()


def test_epsilon_per_token_and_the_distance_scale_are_reported(embedding):
    defense = TextDX(embedding, 3.0, k=10)
    assert defense.epsilon_per_token == 3.0 and defense.metric_epsilon(4) == 12.0
    assert defense.privacy_spent(10) is None
    low, mid, high = defense.nearest_distance_quantiles()
    assert 0 < low <= mid <= high


def test_it_is_a_token_defense_and_the_identity_on_hidden_states(embedding, hidden):
    defense = TextDX(embedding, 3.0)
    assert isinstance(defense, TokenDefense) and defense.token_defense is defense
    assert defense(hidden) is hidden
    assert list(defense.parameters()) == [] and defense.state_dict() == {}
    chain = Compose([defense, GaussianDefense(0.1)])
    assert chain.token_defense is defense
    assert Compose([GaussianDefense(0.1)]).token_defense is None


def test_the_embedding_table_is_read_not_trained(embedding):
    weight = torch.nn.Parameter(embedding.clone())
    defense = TextDX(weight, 3.0)
    assert list(defense.parameters()) == [] and not defense.embedding.requires_grad


@pytest.mark.parametrize(
    "spec", ["textdx:3", "textdx:3,k=20", "textdx:0.5,k=5,seed=1", "textdx:3+gaussian:0.1"]
)
def test_textdx_specs_parse_and_round_trip(embedding, spec):
    defense = parse_defense(spec, embedding=embedding)
    assert isinstance(defense.token_defense, TextDX)
    assert parse_defense(defense.name, embedding=embedding).name == defense.name
    built = DefenseConfig(defense=spec).build_defense(embedding=embedding, keep_ids=[0])
    assert built.name == defense.name and built.token_defense.keep_ids.tolist() == [0]


def test_textdx_spec_values_land_in_the_defense(embedding):
    defense = parse_defense("textdx:0.5,k=5,seed=1", embedding=embedding, keep_ids=[3, 1])
    assert (defense.epsilon, defense.k, defense.seed, defense.keep_ids.tolist()) == (0.5, 5, 1, [1, 3])
    assert parse_defense("textdx:2", embedding=embedding).name == "textdx:2.0"


@pytest.mark.parametrize(
    "spec,hint",
    [
        ("textdx", "needs parameters"),
        ("textdx:0", "> 0"),
        ("textdx:1,k=1", ">= 2"),
        ("textdx:1,top=3", "keys: k, seed"),
        ("gaussian:0.1+textdx:1", "textdx must come first"),
        ("textdx:1+textdx:2", "only once"),
    ],
)
def test_bad_textdx_specs_say_what_is_wrong(embedding, spec, hint):
    with pytest.raises(ValueError, match="Valid defence specs") as info:
        parse_defense(spec, embedding=embedding)
    assert hint in str(info.value)


def test_textdx_without_the_embedding_asks_for_it():
    assert parse_defense_items("textdx:3") == [("textdx", {"epsilon": 3.0})]  # syntax alone is fine
    with pytest.raises(ValueError, match="embedding="):
        parse_defense("textdx:3")


def test_ids_outside_the_embedding_are_refused(embedding):
    with pytest.raises(ValueError, match="outside"):
        TextDX(embedding, 1.0).perturb(torch.tensor([[3, 500]]))


def test_with_k_candidates_an_output_can_rule_a_token_out(line):
    """The K-restriction's cost: token 0 is a possible output from 1, never from 4 (unbounded ratio)."""
    defense = TextDX(line, 0.01, k=3, seed=0)
    from_1 = defense.perturb(torch.full((1, 2000), 1))
    from_4 = defense.perturb(torch.full((1, 2000), 4))
    assert (from_1 == 0).any() and not (from_4 == 0).any()
