"""Prompt formatting, answer-only labels, left padding and the batch stream."""

from __future__ import annotations

import pytest
import torch

from fedsplit.tasks import (
    IGNORE_INDEX,
    Encoded,
    Example,
    collate,
    encode_example,
    encode_prompt,
    iterate_batches,
)

EX = Example("Is the sentiment of this text negative, neutral or positive?", "positive", label=2)


def _answer(tok, enc: Encoded) -> str:
    return tok.decode([t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX])


def test_encode_example_masks_exactly_the_prompt_tokens(chat_tokenizer):
    enc = encode_example(chat_tokenizer, EX)
    prompt = encode_prompt(chat_tokenizer, EX.prompt)
    assert enc.input_ids[: len(prompt)] == prompt
    assert enc.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert enc.labels[len(prompt) :] == enc.input_ids[len(prompt) :]
    assert _answer(chat_tokenizer, enc) == "positive<|im_end|>\n"


def test_chat_template_puts_prompt_in_user_turn_and_completion_in_assistant_turn(chat_tokenizer):
    text = chat_tokenizer.decode(encode_example(chat_tokenizer, EX).input_ids)
    assert text == f"<|im_start|>user\n{EX.prompt}<|im_end|>\n<|im_start|>assistant\npositive<|im_end|>\n"
    assert chat_tokenizer.decode(encode_prompt(chat_tokenizer, EX.prompt)).endswith("<|im_start|>assistant\n")


def test_without_chat_template_prompt_newline_then_completion_and_eos(plain_tokenizer):
    enc = encode_example(plain_tokenizer, EX)
    assert plain_tokenizer.decode(enc.input_ids) == EX.prompt + "\npositive<|endoftext|>"
    assert _answer(plain_tokenizer, enc) == "positive<|endoftext|>"


def test_long_prompt_is_cut_from_the_left_and_keeps_the_answer(chat_tokenizer):
    long = Example("the cat sat on the mat " * 40 + "FINAL QUESTION?", "negative")
    enc = encode_example(chat_tokenizer, long, max_length=40)
    assert len(enc.input_ids) <= 40
    text = chat_tokenizer.decode(enc.input_ids)
    assert text.startswith("<|im_start|>user\n") and "FINAL QUESTION?<|im_end|>" in text
    assert _answer(chat_tokenizer, enc) == "negative<|im_end|>\n"
    assert len(encode_prompt(chat_tokenizer, long.prompt, max_length=30)) <= 30


def test_long_answer_keeps_its_first_token(chat_tokenizer):
    long = Example("short prompt", "positive " * 100)
    enc = encode_example(chat_tokenizer, long, max_length=32)
    assert len(enc.input_ids) == 32
    assert _answer(chat_tokenizer, enc).startswith("positive")
    assert enc.prompt_length < 32


def test_too_small_max_length_is_a_clear_error(chat_tokenizer):
    with pytest.raises(ValueError, match="max_length"):
        encode_example(chat_tokenizer, EX, max_length=4)


def test_collate_left_pads_with_pad_lengths():
    batch = [Encoded([5, 6, 7], [-100, 6, 7]), Encoded([8], [8]), Encoded([1, 2, 3, 4], [-100, -100, 3, 4])]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 8], [1, 2, 3, 4]]
    assert out["labels"].tolist() == [[-100, -100, 6, 7], [-100, -100, -100, 8], [-100, -100, 3, 4]]
    assert out["pad_lengths"].tolist() == [1, 3, 0]
    assert all(t.dtype == torch.long for t in out.values())


def test_iterate_batches_is_endless_deterministic_and_reshuffles_each_epoch(chat_tokenizer):
    examples = [Example(f"prompt {i}", "yes" if i % 2 else "no") for i in range(6)]

    def take(seed, n):
        stream = iterate_batches(examples, chat_tokenizer, 3, seed=seed, max_length=64)
        return [next(stream)["input_ids"].tolist() for _ in range(n)]

    first = take(0, 6)  # three epochs of two batches
    assert first == take(0, 6)
    assert first != take(1, 6)
    epochs = [sorted(map(str, first[i] + first[i + 1])) for i in (0, 2, 4)]
    assert epochs[0] == epochs[1] == epochs[2]  # every epoch holds every example once
    assert [first[0], first[1]] != [first[2], first[3]] or [first[2], first[3]] != [first[4], first[5]]
