"""`fedsplit audit`'s layer: the tap on what the client sends, and the audit of a user's own texts."""

import json

import pytest
import torch

from fedsplit.attacks.audit import (
    AUDIT_TIERS,
    LABEL_NOT_RUN,
    audit_client,
    capture_sent,
    read_texts,
    wire_round_trip,
)
from fedsplit.attacks.tiers import TierConfig
from fedsplit.client.core import LocalTransport, SplitClient
from fedsplit.model.split import load_part
from fedsplit.privacy import parse_defense
from fedsplit.tasks import load_task

FAST = TierConfig(probe_steps=60, finetune_steps=30)


def tiny_client(defense=None) -> SplitClient:
    head, tail = load_part("tiny-llama", "head", 1, 1), load_part("tiny-llama", "tail", 1, 1)
    body = load_part("tiny-llama", "body", span=(1, 3))
    return SplitClient(head, tail, LocalTransport(body), (1, 3), defense=defense)


@pytest.fixture(scope="module")
def texts():
    """The user's texts (sentiment test prompts) and public text (dialogue train prompts)."""
    own = [e.prompt for e in load_task("sentiment", max_examples=128, seed=0).test[:24]]
    public = [e.prompt for e in load_task("dialogue", max_examples=128, seed=0).train]
    return own, public


def test_a_tap_sees_exactly_what_send_returns_and_changes_nothing(tiny):
    _, tokenizer = tiny
    torch.manual_seed(0)
    client = tiny_client(parse_defense("gaussian:0.3"))
    ids = torch.randint(10, 250, (2, 6))
    pad = torch.tensor([0, 2])
    seen = []
    client.taps.append(lambda sent, pad_lengths: seen.append((sent, pad_lengths)))
    hidden = client.run_head(ids, pad)
    sent = client.send(hidden, pad)
    assert len(seen) == 1 and torch.equal(seen[0][0], sent) and seen[0][1] is pad
    assert not seen[0][0].requires_grad

    plain = tiny_client()
    expected = plain.logits(ids, pad)
    plain.taps.append(lambda sent, pad_lengths: None)
    assert torch.equal(plain.logits(ids, pad), expected)


def test_capture_sent_round_trips_through_the_wire_dtype():
    client = tiny_client()
    ids = torch.randint(10, 250, (5, 7))
    pad = torch.tensor([0, 1, 2, 0, 3])
    exact = capture_sent(client, ids, pad, batch_size=2)
    assert exact.shape == (5, 7, 64) and client.taps == []
    with torch.no_grad():
        assert torch.equal(exact, client.run_head(ids, pad))  # no defence: the head's output
    fp16 = capture_sent(client, ids, pad, wire_dtype="fp16")
    assert torch.equal(fp16, exact.half().float())
    assert torch.equal(wire_round_trip(exact, "fp32"), exact)


def test_audit_reports_both_tiers_examples_and_a_headline(tiny, texts):
    _, tokenizer = tiny
    own, public = texts
    report = audit_client(
        tiny_client(),
        tokenizer,
        own,
        spec="tiny-llama",
        head_layers=1,
        public_texts=public,
        defense_spec=None,
        n=24,
        k=8,
        attacks=("probe", "nearest"),
        tier_config=FAST,
        progress=False,
        wire_dtype="fp16",
        label_attack=LABEL_NOT_RUN,
    )
    assert [t.tier for t in report.tiers] == list(AUDIT_TIERS)
    assert report.scored == 16 and report.known_pairs == 8
    for result in report.tiers:
        assert 0.0 <= result.strongest.token_f1 <= 1.0
        assert all(0.0 <= s.token_f1 <= 1.0 for s in result.scores.values())
    public_f1 = report.tier("public").strongest.token_f1
    assert report.tier("known-plaintext").strongest.token_f1 >= public_f1  # it counts the lower tier
    assert report.recovered_percent == round(100 * report.tier("known-plaintext").strongest.token_f1)
    assert report.headline == f"a curious server recovers about {report.recovered_percent} % of your tokens"
    assert len(report.examples) == 3 and all(ex["original"] for ex in report.examples)
    data = json.loads(json.dumps(report.as_dict()))
    assert data["headline"] == report.headline and data["label_attack"] == LABEL_NOT_RUN
    assert {row["tier"] for row in data["tiers"]} == set(AUDIT_TIERS)
    assert data["defense"] == "none" and data["wire_dtype"] == "fp16"


def test_audit_needs_more_texts_than_known_pairs(tiny):
    _, tokenizer = tiny
    args = dict(spec="tiny-llama", head_layers=1, public_texts=["some public text"], defense_spec=None)
    with pytest.raises(ValueError, match="leave none to score"):
        audit_client(tiny_client(), tokenizer, ["a b", "c d", "e f", "g h"], k=4, **args)
    with pytest.raises(ValueError, match="at least 4"):
        audit_client(tiny_client(), tokenizer, ["a b", "c d", "e f", "g h"], k=2, **args)
    with pytest.raises(ValueError, match="unknown attack 'vmi2'"):
        audit_client(tiny_client(), tokenizer, ["a b"] * 9, attacks=("vmi2",), **args)


def test_read_texts_takes_prompt_or_text_and_names_a_bad_line(tmp_path):
    good = tmp_path / "own.jsonl"
    good.write_text('{"prompt": "one"}\n\n{"text": "two", "label": 1}\n')
    assert read_texts(good) == ["one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "one"}\n{"body": "two"}\n')
    with pytest.raises(ValueError, match=r'bad.jsonl:2: no "prompt" or "text" text field \(keys: body\)'):
        read_texts(bad)
