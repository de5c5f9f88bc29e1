"""Metrics on hand-computed cases and with fake models behind LogitsFn / GenerateFn."""

from __future__ import annotations

import math

import pytest
import torch

from fedsplit.tasks import (
    Example,
    Task,
    accuracy_by_label_words,
    classification_scores,
    encode_prompt,
    evaluate,
    exact_match,
    normalize_answer,
    perplexity,
    rouge_scores,
    token_f1,
)

LABELS = ["negative", "neutral", "positive"]


def test_normalize_answer_follows_squad():
    assert normalize_answer("  The Cat, sat!  ") == "cat sat"


def test_exact_match():
    assert exact_match("The cat.", "cat") == 1.0
    assert exact_match("a dog", "cat") == 0.0
    assert exact_match("dog", ["cat", "the dog"]) == 1.0


def test_token_f1_hand_computed():
    # pred: {cat, sat, on, mat} vs ref: {cat, sat} -> p = 2/4, r = 2/2, f1 = 2/3
    assert token_f1("the cat sat on the mat", "a cat sat") == pytest.approx(2 / 3)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("cat", ["dog", "cat"]) == 1.0


def test_rouge_of_identical_strings_is_one_and_of_disjoint_is_zero():
    same = rouge_scores(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    assert rouge_scores(["dogs bark"], ["cats meow"])["rougeL"] == 0.0


def _favouring(tokenizer, word: str, strength: float = 10.0):
    """A fake LogitsFn that predicts the tokens of ``word`` everywhere."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    vocab = len(tokenizer)

    def logits_fn(input_ids, pad_lengths):
        assert input_ids.shape[0] == pad_lengths.shape[0]
        logits = torch.zeros(*input_ids.shape, vocab)
        logits[..., ids] = strength
        return logits

    return logits_fn


def _positive_examples(n=5):
    return [Example(f"Text {i}. Is it negative, neutral or positive?", "positive", label=2) for i in range(n)]


def test_label_word_tokens_do_not_overlap(chat_tokenizer):
    token_sets = [set(chat_tokenizer(w, add_special_tokens=False)["input_ids"]) for w in LABELS]
    assert not (token_sets[0] & token_sets[1]) and not (token_sets[0] & token_sets[2])


def test_accuracy_by_label_words_is_one_when_the_model_favours_the_gold_label(chat_tokenizer):
    acc = accuracy_by_label_words(
        _positive_examples(), chat_tokenizer, _favouring(chat_tokenizer, "positive"), LABELS, batch_size=4
    )
    assert acc == 1.0


def test_accuracy_by_label_words_is_zero_when_the_model_favours_a_wrong_label(chat_tokenizer):
    acc = accuracy_by_label_words(
        _positive_examples(), chat_tokenizer, _favouring(chat_tokenizer, "negative"), LABELS, batch_size=4
    )
    assert acc == 0.0


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(chat_tokenizer):
    vocab = len(chat_tokenizer)

    def uniform(input_ids, pad_lengths):
        return torch.zeros(*input_ids.shape, vocab)

    examples = [Example(f"hello {i}", "how are you doing today? " * (i + 1)) for i in range(5)]
    assert perplexity(examples, chat_tokenizer, uniform, batch_size=2) == pytest.approx(vocab, rel=1e-5)


def _task(kind, examples, label_words=None):
    return Task("t", kind, train=[], val=[], test=examples, label_words=label_words)


def test_evaluate_dispatches_on_the_task_kind(chat_tokenizer):
    qa = [Example(f"Question {i}?", f"answer {i}") for i in range(3)]
    answers = {tuple(encode_prompt(chat_tokenizer, ex.prompt, 256)): ex.completion for ex in qa}

    def oracle(prompts, max_new_tokens):
        eos = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
        return [
            chat_tokenizer(answers[tuple(p)] + "\nrambling", add_special_tokens=False)["input_ids"] + [eos, 7]
            for p in prompts
        ]

    assert evaluate(_task("qa", qa), chat_tokenizer, None, oracle, progress=False) == {
        "exact_match": 1.0,
        "f1": 1.0,
    }
    rouge = evaluate(_task("generation", qa), chat_tokenizer, None, oracle, progress=False)
    assert set(rouge) == {"rouge1", "rouge2", "rougeL"} and rouge["rouge1"] < 1.0  # "rambling" counts here
    cls = evaluate(
        _task("classification", _positive_examples(3), LABELS),
        chat_tokenizer,
        _favouring(chat_tokenizer, "positive"),
        progress=False,
    )
    assert cls == {"accuracy": 1.0, "macro_f1": 1.0}
    ppl = evaluate(
        _task("dialogue", qa),
        chat_tokenizer,
        lambda ids, pad: torch.zeros(*ids.shape, 9000),
        progress=False,
        max_examples=2,
    )
    assert ppl["perplexity"] == pytest.approx(9000, rel=1e-5)
    assert math.isfinite(ppl["perplexity"])


def test_evaluate_generation_without_generate_fn_is_a_clear_error(chat_tokenizer):
    with pytest.raises(ValueError, match="generate_fn"):
        evaluate(_task("qa", [Example("q", "a")]), chat_tokenizer, None, progress=False)


def _causal_random_model(vocab: int, seed: int = 0):
    """A fake causal LM: each position's logits depend on the non-pad tokens up to it, not on padding."""
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed))

    def logits_fn(input_ids, pad_lengths):
        positions = torch.arange(input_ids.shape[1])
        real = (positions[None, :] >= pad_lengths[:, None]).long()
        return table[((input_ids * real) * 7919).cumsum(dim=1) % vocab]  # a hash of the real prefix

    return logits_fn


@pytest.mark.parametrize(
    "words, one_token", [(["a", "b", "c"], True), (["negative", "neutral", "positive"], False)]
)
def test_label_word_predictions_equal_full_answer_scoring(chat_tokenizer, words, one_token):
    from fedsplit.tasks.metrics import (
        _label_word_encoding,
        _single_token_choices,
        answer_log_likelihoods,
        predict_label_words,
    )

    logits_fn = _causal_random_model(len(chat_tokenizer))
    examples = [Example(f"Text number {i} {'x' * i}. Which?", words[0], label=0) for i in range(7)]
    got = predict_label_words(examples, chat_tokenizer, logits_fn, words, batch_size=3)
    encoded = [_label_word_encoding(chat_tokenizer, ex.prompt, w, 256) for ex in examples for w in words]
    scores = answer_log_likelihoods(encoded, logits_fn, chat_tokenizer.pad_token_id, batch_size=1)
    k = len(words)
    want = [max(range(k), key=lambda w: scores[i * k + w][0]) for i in range(len(examples))]
    assert got == want
    # single-token words take the one-forward path, the others the full scoring; both agree above
    assert (_single_token_choices(encoded[:k]) is not None) == one_token
    if one_token:
        assert len(set(want)) > 1  # the fake model does not favour one word everywhere


def test_macro_f1_exposes_a_model_that_always_answers_the_most_common_label():
    golds = [0] * 6 + [1] * 3 + [2]
    always_first = classification_scores([0] * 10, golds)
    assert always_first["accuracy"] == 0.6
    assert always_first["macro_f1"] == pytest.approx((2 * 6 / 16) / 3)  # label 0's F1 0.75; 1 and 2 score 0
    perfect = classification_scores(golds, golds)
    assert perfect == {"accuracy": 1.0, "macro_f1": 1.0}
    one_wrong = classification_scores([0] * 6 + [1, 1, 2, 2], golds)  # a 1 answered as 2
    assert one_wrong["accuracy"] == 0.9
    assert one_wrong["macro_f1"] == pytest.approx((1.0 + 2 * 2 / 5 + 2 * 1 / 3) / 3)
    with pytest.raises(ValueError):
        classification_scores([0], [0, 1])
