"""The learned inverter: trained on public text only, it beats chance on unseen victim text."""

import pytest
import torch

from fedsplit.attacks import Inverter, encode_texts, refine, token_batches, token_prf, train_inverter
from fedsplit.model.loading import load_model
from fedsplit.model.split import split
from fedsplit.privacy import parse_defense
from fedsplit.tasks import load_task


def f1_of(pred, ids, score):
    return token_prf(
        [p[m].tolist() for p, m in zip(pred, score)], [t[m].tolist() for t, m in zip(ids, score)]
    )[2]


@pytest.fixture(scope="module")
def attack_setup():
    """``make(defense_spec)`` -> (head, inverter, sent, pad, ids, score), one training per spec.

    Auxiliary text is the sentiment train split, victims its test split: disjoint.
    """
    task = load_task("sentiment", max_examples=192, seed=0)
    model, tokenizer = load_model("tiny-llama")
    head = split(model, 1, 0).head
    aux_ids, aux_pad, _ = encode_texts(tokenizer, [e.prompt for e in task.train], 24)
    ids, pad, score = encode_texts(tokenizer, [e.prompt for e in task.test[:16]], 24)
    made = {}

    def make(defense_spec=None):
        if defense_spec not in made:
            torch.manual_seed(0)
            defense = parse_defense(defense_spec, hidden_size=64)
            with torch.no_grad():
                hidden = head(ids, pad)
                sent = defense(hidden, pad) if defense is not None else hidden
            inverter = train_inverter(
                head,
                token_batches(aux_ids, aux_pad, 32),
                parse_defense(defense_spec, hidden_size=64),
                steps=60,
                seed=0,
                ignore_ids=tokenizer.all_special_ids,
                progress=False,
            )
            made[defense_spec] = (head, inverter, sent, pad, ids, score)
        return made[defense_spec]

    return make


def test_learned_inverter_beats_chance_on_unseen_text(attack_setup):
    _, inverter, sent, pad, ids, score = attack_setup()
    assert f1_of(inverter.decode(sent, pad), ids, score) > 0.6


def test_learned_inverter_trained_with_the_defence_still_beats_chance(attack_setup):
    _, inverter, sent, pad, ids, score = attack_setup("gaussian:1.0:relative")
    assert f1_of(inverter.decode(sent, pad), ids, score) > 0.3


def test_bisr_refinement_keeps_a_good_start(attack_setup):
    head, inverter, sent, pad, ids, score = attack_setup()
    guess = inverter.decode(sent, pad)
    refined = refine(head, sent, pad, guess, steps=30, vocab_size=261, progress=False)
    assert f1_of(refined, ids, score) >= f1_of(guess, ids, score) - 0.05


def test_inverter_predicts_only_tokens_seen_in_the_auxiliary_text(tiny, head_of):
    _, tokenizer = tiny
    head = head_of(1)
    ids, pad, _ = encode_texts(tokenizer, ["aaa bbb", "ab"], 8)
    inverter = train_inverter(
        head, [(ids, pad)], steps=2, progress=False, ignore_ids=tokenizer.all_special_ids
    )
    assert set(inverter.vocab_ids.tolist()) == set(tokenizer("ab ", add_special_tokens=False)["input_ids"])
    out = inverter.decode(torch.randn(2, 5, 64))
    assert set(out.flatten().tolist()) <= set(inverter.vocab_ids.tolist())
    assert not inverter.training


def test_training_is_seeded(tiny, head_of):
    _, tokenizer = tiny
    head = head_of(1)
    ids, pad, _ = encode_texts(tokenizer, ["hello world", "good bye"], 8)
    a, b = (train_inverter(head, [(ids, pad)], steps=3, seed=1, progress=False) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_inverter_rejects_a_width_heads_mismatch():
    with pytest.raises(ValueError, match="divisible"):
        Inverter(64, torch.arange(5), width=30, heads=4)
