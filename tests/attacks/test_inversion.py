"""Optimisation attacks on the tiny model: they beat chance, and noise hurts them."""

import pytest
import torch

from fedsplit.attacks import invert_nearest, invert_relaxation, invert_vmi, nearest_tokens, token_prf
from fedsplit.attacks.inversion import buckets, frozen
from fedsplit.privacy import parse_defense


def f1_of(pred, ids, score):
    return token_prf(
        [p[m].tolist() for p, m in zip(pred, score)], [t[m].tolist() for t, m in zip(ids, score)]
    )[2]


def random_f1(ids, score, vocab, seed=0):
    guess = torch.randint(0, vocab, ids.shape, generator=torch.Generator().manual_seed(seed))
    return f1_of(guess, ids, score)


def observed(head, ids, pad, defense_spec=None, seed=0):
    torch.manual_seed(seed)
    defense = parse_defense(defense_spec, hidden_size=head.embed_tokens.weight.shape[1])
    with torch.no_grad():
        hidden = head(ids, pad)
        return defense(hidden, pad) if defense is not None else hidden


def test_nearest_tokens_l2_and_cosine_find_exact_rows():
    table = torch.randn(50, 8)
    ids = torch.tensor([[3, 7, 49], [0, 1, 2]])
    assert torch.equal(nearest_tokens(table[ids], table, "l2", chunk=2), ids)
    assert torch.equal(nearest_tokens(table[ids], table, "cosine"), ids)


def test_nearest_recovers_every_token_at_p0(head_of, victims):
    tokenizer, ids, pad, score = victims
    head = head_of(0)
    pred = invert_nearest(head, observed(head, ids, pad), pad, vocab_size=len(tokenizer))
    assert f1_of(pred, ids, score) == 1.0


def test_strong_gaussian_noise_lowers_nearest_f1(head_of, victims):
    tokenizer, ids, pad, score = victims
    head = head_of(0)
    noisy = observed(head, ids, pad, "gaussian:5.0:relative")
    assert f1_of(invert_nearest(head, noisy, pad, vocab_size=len(tokenizer)), ids, score) < 0.3


def test_vmi_recovers_most_tokens_at_p1(head_of, victims):
    tokenizer, ids, pad, score = victims
    head = head_of(1)
    pred = invert_vmi(
        head, observed(head, ids, pad), pad, steps=60, vocab_size=len(tokenizer), progress=False
    )
    f1 = f1_of(pred, ids, score)
    assert f1 > 0.8
    assert f1 > random_f1(ids, score, len(tokenizer)) + 0.5


def test_strong_gaussian_noise_lowers_vmi_f1(head_of, victims):
    tokenizer, ids, pad, score = victims
    head = head_of(1)
    kwargs = dict(steps=60, vocab_size=len(tokenizer), progress=False)
    clean = f1_of(invert_vmi(head, observed(head, ids, pad), pad, **kwargs), ids, score)
    noisy = f1_of(
        invert_vmi(head, observed(head, ids, pad, "gaussian:5.0:relative"), pad, **kwargs), ids, score
    )
    assert noisy < clean - 0.3


def test_relaxation_beats_chance_at_p1(head_of, victims):
    tokenizer, ids, pad, score = victims
    head = head_of(1)
    pred = invert_relaxation(
        head, observed(head, ids, pad), pad, steps=60, vocab_size=len(tokenizer), progress=False
    )
    assert f1_of(pred, ids, score) > random_f1(ids, score, len(tokenizer)) + 0.5


def test_relaxation_with_candidate_lists_beats_chance(head_of, victims):
    tokenizer, ids, pad, score = victims
    head = head_of(1)
    pred = invert_relaxation(
        head,
        observed(head, ids, pad),
        pad,
        steps=60,
        candidates=16,
        vocab_size=len(tokenizer),
        progress=False,
    )
    assert f1_of(pred, ids, score) > random_f1(ids, score, len(tokenizer)) + 0.4


def test_attacks_leave_the_head_untouched(head_of, victims):
    tokenizer, ids, pad, _ = victims
    head = head_of(1)
    head.train()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    invert_vmi(head, observed(head, ids, pad), pad, steps=2, progress=False)
    assert head.training
    assert all(p.requires_grad and p.grad is None for p in head.parameters())
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())


def test_frozen_restores_flags_after_an_error(head_of):
    head = head_of(1)
    with pytest.raises(RuntimeError), frozen(head):
        raise RuntimeError
    assert all(p.requires_grad for p in head.parameters())


def test_dropping_all_pad_columns_of_a_bucket_is_exact(head_of, victims):
    _, ids, pad, score = victims
    head = head_of(2)
    with torch.no_grad():
        full = head(ids, pad)
        for rows, cut in buckets(pad, 3):
            part = head(ids[rows, cut:], pad[rows] - cut)
            mask = score[rows, cut:]
            torch.testing.assert_close(part[mask], full[rows, cut:][mask], rtol=1e-5, atol=1e-5)


def test_buckets_cover_every_row_once():
    pad = torch.tensor([3, 0, 5, 1, 0])
    groups = buckets(pad, 2)
    rows = torch.cat([r for r, _ in groups])
    assert sorted(rows.tolist()) == list(range(5))
    assert all(cut == int(pad[r].min()) for r, cut in groups)
