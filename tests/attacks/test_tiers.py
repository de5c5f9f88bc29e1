"""Attackers at three tiers: public, known-plaintext (K victim pairs), oracle (the client's head)."""

import pytest
import torch
from torch import nn

from fedsplit.attacks import (
    AttackerKnowledge,
    AttackScore,
    KnownPairs,
    TierConfig,
    TierResult,
    encode_texts,
    evaluate_tiers,
    finetune_on_pairs,
    fit_state_map,
    run_tier,
    score_tier,
    split_known,
    token_batches,
    train_probe,
)
from fedsplit.attacks.inversion import real_mask
from fedsplit.model.loading import load_model
from fedsplit.model.split import split
from fedsplit.tasks import load_task

FAST = TierConfig(probe_steps=80, finetune_steps=100)


class SecretHead(nn.Module):
    """The client's head: the public head followed by a secret rotation of its output."""

    def __init__(self, head: nn.Module, seed: int = 123) -> None:
        super().__init__()
        self.head, self.embed_tokens = head, head.embed_tokens
        q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(seed)))
        self.register_buffer("rotation", q)

    def forward(self, *args, **kwargs):
        return self.head(*args, **kwargs) @ self.rotation


@pytest.fixture(scope="module")
def world():
    """Public dialogue text; 64 sentiment victims behind a secret client head, 24 of them known."""
    model, tokenizer = load_model("tiny-llama")
    head = split(model, 1, 0).head
    client = SecretHead(head)
    public = [e.completion for e in load_task("dialogue", max_examples=128, seed=0).train]
    victims = [e.prompt for e in load_task("sentiment", max_examples=256, seed=0).test[:64]]
    pub_ids, pub_pad, _ = encode_texts(tokenizer, public, 24)
    ids, pad, score = encode_texts(tokenizer, victims, 24)
    with torch.no_grad():
        sent = client(ids, pad)
    known, evaluated = split_known(ids, pad, sent, k=24)
    knowledge = AttackerKnowledge(
        public_head=head,
        public_batches=token_batches(pub_ids, pub_pad, 32),
        known_pairs=known,
        client_head=client,
        vocab_size=len(tokenizer),
        ignore_ids=tuple(tokenizer.all_special_ids),
    )
    observed = (sent[evaluated], pad[evaluated], ids[evaluated], score[evaluated])
    torch.manual_seed(0)
    results = evaluate_tiers(knowledge, *observed, attacks=("probe",), config=FAST)
    return dict(knowledge=knowledge, observed=observed, results={r.tier: r for r in results}, head=head)


def f1(world, tier, attack):
    return world["results"][tier].scores[attack].token_f1


def test_known_plaintext_alignment_reads_what_the_public_tier_cannot_behind_a_secret_map(world):
    assert f1(world, "known-plaintext", "probe+align") > f1(world, "public", "probe") + 0.4
    kp = world["results"]["known-plaintext"].strongest
    assert kp.tier == "known-plaintext" and kp.token_f1 > 0.8


def test_finetuning_on_the_known_pairs_also_beats_the_public_tier(world):
    assert f1(world, "known-plaintext", "probe+finetune") > f1(world, "public", "probe") + 0.4


def test_oracle_is_at_least_as_strong_as_the_public_tier(world):
    assert f1(world, "oracle", "probe") >= f1(world, "public", "probe")
    results = world["results"]
    assert results["oracle"].strongest.token_f1 >= results["known-plaintext"].strongest.token_f1
    assert results["known-plaintext"].strongest.token_f1 >= results["public"].strongest.token_f1


def test_each_tier_reports_only_what_is_new_at_it(world):
    assert set(world["results"]["public"].scores) == {"probe"}
    adapted = {"probe+finetune", "probe+align", "probe+align+finetune"}
    assert set(world["results"]["known-plaintext"].scores) == adapted
    assert set(world["results"]["oracle"].scores) == {"probe"} | adapted


def test_state_map_undoes_a_secret_linear_map(world):
    knowledge = world["knowledge"]
    sent, pad, ids, _ = world["observed"]
    state_map = fit_state_map(knowledge.known_pairs, knowledge.public_head)
    with torch.no_grad():
        clean = world["head"](ids, pad)
    real = real_mask(pad, ids.shape[1])
    cosine = torch.cosine_similarity(state_map(sent)[real], clean[real], dim=-1)
    assert cosine.mean() > 0.99
    assert torch.cosine_similarity(sent[real], clean[real], dim=-1).mean() < 0.5


def test_known_texts_are_never_scored_even_when_the_victim_set_repeats_a_text(tiny):
    _, tokenizer = tiny
    texts = ["same text", "other one", "same text", "third", "fourth", "fifth", "same text", "sixth"]
    ids, pad, _ = encode_texts(tokenizer, texts, 12)
    hidden = torch.randn(*ids.shape, 64)
    for seed in range(5):
        known, evaluated = split_known(ids, pad, hidden, k=3, seed=seed)
        known_texts = {tuple(r[p:].tolist()) for r, p in zip(known.ids, known.pad)}
        scored_texts = {tuple(ids[i, pad[i] :].tolist()) for i in evaluated.tolist()}
        assert len(known) == 3 and not known_texts & scored_texts
        assert len(evaluated) + 3 <= len(texts)
        for row_ids, row_hidden in zip(known.ids, known.hidden):  # each pair keeps its own states
            assert any(
                torch.equal(row_hidden, hidden[i])
                for i in torch.nonzero((ids == row_ids).all(1)).flatten().tolist()
            )


def test_scoring_refuses_a_known_text_among_the_scored_victims(world):
    known = world["knowledge"].known_pairs
    mask = real_mask(known.pad, known.ids.shape[1])
    with pytest.raises(ValueError, match="split_known"):
        score_tier("public", {"probe": known.ids}, known.ids, mask, known=known)


def test_strongest_attack_is_the_highest_f1_and_is_named():
    truth = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(truth, dtype=torch.bool)
    recovered = {
        "weak": torch.tensor([[1, 2, 3, 4]]),
        "best": truth.clone(),
        "half": torch.tensor([[5, 6, 0, 0]]),
    }
    result = score_tier("known-plaintext", recovered, truth, mask)
    assert (result.strongest.attack, result.strongest.token_f1) == ("best", 1.0)
    assert result.scores["half"].token_f1 == pytest.approx(0.5)
    assert result.as_dict() == {
        "tier": "known-plaintext",
        "attack_tier": "known-plaintext",
        "attack": "best",
        "token_precision": 1.0,
        "token_recall": 1.0,
        "token_f1": 1.0,
    }


def test_strongest_attack_counts_the_tiers_below():
    truth, mask = torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.bool)
    public = TierResult("public", AttackScore("public", "probe", 0.9, 0.9, 0.9), {})
    result = score_tier("oracle", {"vmi": torch.tensor([[5, 6, 0, 0]])}, truth, mask, below=[public])
    assert (result.strongest.tier, result.strongest.attack) == ("public", "probe")
    assert set(result.scores) == {"vmi"}


def test_tiers_ask_for_what_they_need(world):
    knowledge = world["knowledge"]
    sent, pad, _, _ = world["observed"]
    bare = AttackerKnowledge(knowledge.public_head, knowledge.public_batches)
    with pytest.raises(ValueError, match="known pairs"):
        run_tier("known-plaintext", bare, sent, pad)
    no_head = AttackerKnowledge(
        knowledge.public_head, knowledge.public_batches, known_pairs=knowledge.known_pairs
    )
    with pytest.raises(ValueError, match="client's head"):
        run_tier("oracle", no_head, sent, pad)
    with pytest.raises(ValueError, match="public, known-plaintext, oracle"):
        run_tier("insider", knowledge, sent, pad)
    with pytest.raises(ValueError, match="probe-mlp"):
        run_tier("public", knowledge, sent, pad, attacks=("telepathy",))


def test_the_public_tier_holds_neither_the_pairs_nor_the_client_head(world):
    public = world["knowledge"].at("public")
    assert public.known_pairs is None and public.client_head is None
    assert world["knowledge"].at("known-plaintext").client_head is None


def test_finetuning_grows_the_vocabulary_and_never_ends_worse_on_the_held_out_pairs(tiny, head_of):
    _, tokenizer = tiny
    head = head_of(1)
    public_ids, public_pad, _ = encode_texts(tokenizer, ["abc abc", "cab bac"], 8)
    probe = train_probe(head, [(public_ids, public_pad)], steps=20)
    ids, pad, _ = encode_texts(tokenizer, [f"xyz {i} abc" for i in range(12)], 12)
    with torch.no_grad():
        pairs = KnownPairs(ids, pad, head(ids, pad))
    tuned = finetune_on_pairs(probe, pairs, head.embed_tokens.weight, steps=30, lr=1e-2)
    assert set(tokenizer("xyz", add_special_tokens=False)["input_ids"]) <= set(tuned.vocab_ids.tolist())
    assert set(probe.vocab_ids.tolist()) < set(tuned.vocab_ids.tolist())
    _, held = pairs.split(0.25, 0)
    real = real_mask(held.pad, held.ids.shape[1])

    def held_accuracy(model):
        return (model.decode(held.hidden, held.pad) == held.ids)[real].float().mean()

    assert held_accuracy(tuned) >= held_accuracy(probe)


def test_every_attack_runs_at_every_tier_with_the_expected_names(world):
    knowledge = world["knowledge"]
    sent, pad, _, _ = (t[:4] for t in world["observed"])
    config = TierConfig(probe_steps=3, inverter_steps=3, vmi_steps=2, bisr_steps=2, finetune_steps=2)
    attacks = ("learned", "bisr", "vmi")
    cache = {}
    names = {
        tier: set(run_tier(tier, knowledge, sent, pad, attacks=attacks, config=config, cache=cache))
        for tier in ("public", "known-plaintext", "oracle")
    }
    adapted = {f"{a}+{how}" for a in ("learned", "bisr") for how in ("finetune", "align", "align+finetune")}
    adapted.add("vmi+align")
    assert names == {"public": set(attacks), "known-plaintext": adapted, "oracle": set(attacks) | adapted}
    # One inverter per head: bisr reuses learned's, and the known-plaintext tier adapts the public one.
    assert {key for key in cache if len(key) == 2} == {("public", "learned"), ("client", "learned")}
