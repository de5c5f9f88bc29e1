"""The per-position probe: trained on public chit-chat only, it reads unseen sentiment prompts."""

from collections import Counter

import pytest
import torch

from fedsplit.attacks import Probe, encode_texts, token_batches, token_prf, train_probe
from fedsplit.attacks.inversion import real_mask
from fedsplit.model.loading import load_model
from fedsplit.model.split import split
from fedsplit.privacy import parse_defense
from fedsplit.tasks import load_task


def f1_of(pred, ids, score):
    return token_prf(
        [p[m].tolist() for p, m in zip(pred, score)], [t[m].tolist() for t, m in zip(ids, score)]
    )[2]


@pytest.fixture(scope="module")
def setup():
    """Public text: dialogue replies; victims: sentiment test prompts (another task, never seen)."""
    model, tokenizer = load_model("tiny-llama")
    head = split(model, 1, 0).head
    public = [e.completion for e in load_task("dialogue", max_examples=128, seed=0).train]
    victims = [e.prompt for e in load_task("sentiment", max_examples=192, seed=0).test[:32]]
    pub_ids, pub_pad, _ = encode_texts(tokenizer, public, 24)
    ids, pad, score = encode_texts(tokenizer, victims, 24)
    with torch.no_grad():
        hidden = head(ids, pad)
    return dict(
        head=head,
        batches=token_batches(pub_ids, pub_pad, 32),
        ids=ids,
        pad=pad,
        score=score,
        hidden=hidden,
        special=tokenizer.all_special_ids,
    )


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_probe_reads_unseen_text_far_better_than_guessing_the_commonest_token(setup, kind):
    torch.manual_seed(0)
    probe = train_probe(setup["head"], setup["batches"], kind=kind, steps=80, ignore_ids=setup["special"])
    public = torch.cat([ids[real_mask(pad, ids.shape[1])] for ids, pad in setup["batches"]])
    commonest = Counter(public.tolist()).most_common(1)[0][0]
    chance = f1_of(torch.full_like(setup["ids"], commonest), setup["ids"], setup["score"])
    f1 = f1_of(probe.decode(setup["hidden"], setup["pad"]), setup["ids"], setup["score"])
    assert chance < 0.3
    assert f1 > 0.8 and f1 > chance + 0.5


def test_probe_trained_with_the_defence_still_reads_through_it(setup):
    torch.manual_seed(0)
    sent = parse_defense("gaussian:1.0:relative", hidden_size=64)(setup["hidden"], setup["pad"])
    attacker_defense = parse_defense("gaussian:1.0:relative", hidden_size=64)
    probe = train_probe(setup["head"], setup["batches"], attacker_defense, steps=80, seed=1)
    f1 = f1_of(probe.decode(sent, setup["pad"]), setup["ids"], setup["score"])
    assert f1 > 0.7


def test_probe_reads_each_position_alone(setup):
    probe = train_probe(setup["head"], setup["batches"][:1], steps=5)
    hidden = setup["hidden"][:2]
    shuffled = hidden[:, torch.randperm(hidden.shape[1])]
    together = probe.decode(shuffled)
    alone = torch.stack([probe.decode(shuffled[:, t : t + 1])[:, 0] for t in range(hidden.shape[1])], 1)
    assert torch.equal(together, alone)


def test_probe_predicts_only_tokens_seen_in_the_public_text(tiny, head_of):
    _, tokenizer = tiny
    ids, pad, _ = encode_texts(tokenizer, ["aaa bbb", "ab"], 8)
    probe = train_probe(head_of(1), [(ids, pad)], steps=2, ignore_ids=tokenizer.all_special_ids)
    assert set(probe.vocab_ids.tolist()) == set(tokenizer("ab ", add_special_tokens=False)["input_ids"])
    out = probe.decode(torch.randn(2, 5, 64))
    assert set(out.flatten().tolist()) <= set(probe.vocab_ids.tolist())
    assert not probe.training


def test_probe_training_is_seeded(setup):
    a, b = (train_probe(setup["head"], setup["batches"][:2], kind="mlp", steps=3, seed=4) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_unknown_probe_kind_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="linear, mlp"):
        Probe(8, torch.arange(3), kind="forest")


def test_tied_probe_names_tokens_the_public_text_never_showed_it(setup):
    """Scored against every embedding row, the tied probe reads tokens outside its training classes."""
    torch.manual_seed(0)
    kwargs = dict(steps=80, ignore_ids=setup["special"])
    linear = train_probe(setup["head"], setup["batches"], kind="linear", **kwargs)
    tied = train_probe(setup["head"], setup["batches"], kind="tied", **kwargs)
    real = setup["score"]
    unseen = real & ~torch.isin(setup["ids"], tied.vocab_ids)
    assert unseen.sum() > 10, "the victims need tokens the public text lacks"
    got = tied.decode(setup["hidden"], setup["pad"])
    assert (got[unseen] == setup["ids"][unseen]).float().mean() > 0.5  # the linear probe: 0 by construction
    assert not (linear.decode(setup["hidden"], setup["pad"])[unseen] == setup["ids"][unseen]).any()
    assert f1_of(got, setup["ids"], real) > f1_of(
        linear.decode(setup["hidden"], setup["pad"]), setup["ids"], real
    )
    assert set(got[real].tolist()).isdisjoint(setup["special"])
