"""Prompt formatting, tokenization with answer-only labels, left-padded batches.

A prompt is the user turn and the completion the assistant turn of the tokenizer's chat template; a
tokenizer without a template gets ``prompt + "\\n"`` then ``completion`` + EOS. The prompt text (with the
generation prompt) and the answer text are tokenized separately and concatenated, so the prompt ids of
a training example are exactly the ids ``encode_prompt`` gives at generation time, and the label mask
boundary is exact.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .base import Example

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_warned_prefix = False


@dataclass
class Encoded:
    """Token ids of one example; ``labels`` is -100 on the prompt tokens and the ids on the answer."""

    input_ids: list[int]
    labels: list[int]

    @property
    def prompt_length(self) -> int:
        """Number of leading tokens that are prompt (label -100)."""
        return next((i for i, label in enumerate(self.labels) if label != IGNORE_INDEX), len(self.labels))


def has_chat_template(tokenizer: Any) -> bool:
    """True if the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: Any, prompt: str) -> str:
    """The prompt as text: the chat-formatted user turn plus the generation prompt, or ``prompt + "\\n"``."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt + "\n"


def format_answer(tokenizer: Any, prompt: str, completion: str) -> str:
    """The answer as text as it follows ``format_prompt``: the assistant turn with its end marker."""
    global _warned_prefix
    if has_chat_template(tokenizer):
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
            tokenize=False,
        )
        head = format_prompt(tokenizer, prompt)
        if full.startswith(head):
            return full[len(head) :]
        if not _warned_prefix:
            log.warning("chat template: the prompt is not a prefix of the full chat; using completion + EOS")
            _warned_prefix = True
    return completion + (tokenizer.eos_token or "")


def text_ids(tokenizer: Any, text: str, *, bos: bool) -> list[int]:
    """Token ids of ``text``.

    Chat-formatted text already holds its special tokens, so none are added. Plain text at the start of
    a sequence (``bos=True``) gets the special tokens the tokenizer puts in front (BOS), never the ones
    it appends (a BERT-style SEP/EOS would end the prompt before its answer).
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if bos and not has_chat_template(tokenizer):
        probe = list(tokenizer("a", add_special_tokens=False)["input_ids"])
        full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
        front = next(
            (full[:k] for k in range(len(full) - len(probe) + 1) if full[k : k + len(probe)] == probe), []
        )
        ids = front + ids
    return ids


def _prompt_ids(tokenizer: Any, prompt: str, budget: int) -> list[int]:
    """Ids of the formatted prompt, dropping tokens from the left of its content until it fits ``budget``.

    The chat wrapper (system prompt, role markers, generation prompt) is never cut. Raises ValueError
    if even the empty prompt does not fit.
    """
    ids = text_ids(tokenizer, format_prompt(tokenizer, prompt), bos=True)
    if len(ids) <= budget:
        return ids
    empty = text_ids(tokenizer, format_prompt(tokenizer, ""), bos=True)
    if len(empty) > budget:
        raise ValueError(
            f"max_length is too small: the prompt template alone takes {len(empty)} tokens and only {budget} "
            "are left for it; raise max_length"
        )
    content = text_ids(tokenizer, prompt, bos=False)
    drop = len(ids) - budget
    # Decoding a token slice and re-tokenizing can shift a token or two, so cut until it fits.
    for _ in range(8):
        if drop >= len(content):
            break
        ids = text_ids(tokenizer, format_prompt(tokenizer, tokenizer.decode(content[drop:])), bos=True)
        if len(ids) <= budget:
            return ids
        drop += max(1, len(ids) - budget)
    return empty


def encode_prompt(tokenizer: Any, prompt: str, max_length: int = 256) -> list[int]:
    """Token ids of the chat-formatted prompt with the generation prompt appended (what a model continues).

    A prompt longer than ``max_length`` tokens loses tokens from the start of its content.
    """
    return _prompt_ids(tokenizer, prompt, max_length)


def encode_example(tokenizer: Any, ex: Example, max_length: int = 256) -> Encoded:
    """Tokenize a prompt/answer pair for training; the loss sees only the answer.

    Too long: the prompt content is cut from the left first. The answer keeps its first token always;
    it is cut from the right only when the prompt template plus the answer would not fit, and then to no
    less than half the room left after the template.
    """
    if max_length < 2:
        raise ValueError("max_length must be at least 2")
    answer = text_ids(tokenizer, format_answer(tokenizer, ex.prompt, ex.completion), bos=False)
    if not answer:
        raise ValueError(f"the completion {ex.completion!r} tokenizes to nothing")
    prompt = text_ids(tokenizer, format_prompt(tokenizer, ex.prompt), bos=True)
    if len(prompt) + len(answer) > max_length:
        overhead = len(text_ids(tokenizer, format_prompt(tokenizer, ""), bos=True))
        room = max_length - overhead
        if room < 1:
            raise ValueError(
                f"max_length={max_length} leaves no room for the answer after the {overhead}-token prompt template"
            )
        content = len(prompt) - overhead
        answer = answer[: max(room - content, room // 2, 1)]
        prompt = _prompt_ids(tokenizer, ex.prompt, max_length - len(answer))
    return Encoded(input_ids=prompt + answer, labels=[IGNORE_INDEX] * len(prompt) + list(answer))


def pad_id_of(tokenizer: Any) -> int:
    """The id used for padding: the pad token, else EOS, else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad a batch: ``input_ids`` and ``labels`` (-100 on pads) as LongTensor[B, T], and
    ``pad_lengths`` LongTensor[B], the number of pads at the start of each row."""
    if not batch:
        raise ValueError("collate needs at least one example")
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    pad_lengths = torch.empty(len(batch), dtype=torch.long)
    for row, enc in enumerate(batch):
        pad = width - len(enc.input_ids)
        input_ids[row, pad:] = torch.tensor(enc.input_ids, dtype=torch.long)
        labels[row, pad:] = torch.tensor(enc.labels, dtype=torch.long)
        pad_lengths[row] = pad
    return {"input_ids": input_ids, "labels": labels, "pad_lengths": pad_lengths}


def iterate_batches(
    examples: Sequence[Example], tokenizer: Any, batch_size: int, *, seed: int, max_length: int = 256
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless stream of collated training batches.

    Each epoch visits every example once in a fresh seeded order; batches are always full and may span
    two epochs. The same seed gives the same stream. Examples are tokenized once, on first use.
    """
    if not examples:
        raise ValueError("iterate_batches needs at least one example")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    rng = random.Random(seed)
    pad_id = pad_id_of(tokenizer)
    cache: dict[int, Encoded] = {}

    def order() -> Iterator[int]:
        while True:
            epoch = list(range(len(examples)))
            rng.shuffle(epoch)
            yield from epoch

    indices = order()
    while True:
        batch = []
        for _ in range(batch_size):
            i = next(indices)
            if i not in cache:
                cache[i] = encode_example(tokenizer, examples[i], max_length)
            batch.append(cache[i])
        yield collate(batch, pad_id)
