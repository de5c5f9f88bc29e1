"""Evaluate a Task with a model reached only through a LogitsFn (and a GenerateFn for free text)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from tqdm.auto import tqdm

from .base import Example, Task, subsample
from .metrics import LogitsFn, perplexity, qa_scores, rouge_scores, scores_by_label_words
from .prompts import encode_prompt

log = logging.getLogger(__name__)

GenerateFn = Callable[[list[list[int]], int], list[list[int]]]
"""(prompt token id lists, max_new_tokens) -> generated token id lists (without the prompt)."""

_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")


def stop_ids(tokenizer: Any) -> set[int]:
    """Ids that end an answer: EOS and the usual end-of-turn tokens present in the vocabulary."""
    ids = {tokenizer.eos_token_id} if isinstance(getattr(tokenizer, "eos_token_id", None), int) else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in _END_OF_TURN if t in vocab)
    return ids


def decode_answer(tokenizer: Any, ids: Sequence[int], *, first_line: bool = False) -> str:
    """Text of generated ids, cut at the first end-of-turn token (and the first line break if asked)."""
    stops = stop_ids(tokenizer)
    end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    text = tokenizer.decode(list(ids[:end]), skip_special_tokens=True).strip()
    if first_line:
        text = text.split("\n", 1)[0].strip()
    return text


def generate_answers(
    examples: Sequence[Example],
    tokenizer: Any,
    generate_fn: GenerateFn,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    max_length: int = 256,
    first_line: bool = False,
    progress: bool = False,
) -> list[str]:
    """Generate an answer for each example's prompt (prompts cut to ``max_length`` tokens)."""
    prompts = [encode_prompt(tokenizer, ex.prompt, max_length) for ex in examples]
    answers: list[str] = []
    with tqdm(total=len(prompts), desc="generating", unit="ex", disable=not progress) as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            generated = generate_fn(chunk, max_new_tokens)
            if len(generated) != len(chunk):
                raise ValueError(f"generate_fn returned {len(generated)} sequences for {len(chunk)} prompts")
            answers.extend(decode_answer(tokenizer, ids, first_line=first_line) for ids in generated)
            bar.update(len(chunk))
    return answers


def evaluate(
    task: Task,
    tokenizer: Any,
    logits_fn: LogitsFn,
    generate_fn: GenerateFn | None = None,
    *,
    split: str = "test",
    max_examples: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    progress: bool = True,
    max_length: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Score ``task`` on one split; the metric follows the task's kind.

    classification → ``{"accuracy", "macro_f1"}`` (label words scored by log-likelihood, no generation);
    generation → ``{"rouge1", "rouge2", "rougeL"}``; qa → ``{"exact_match", "f1"}`` (first line of the
    generated answer); dialogue → ``{"perplexity"}``. Generation and qa need ``generate_fn``.
    ``max_examples`` scores a seeded random subset; ``max_length`` defaults to ``task.max_length``.
    """
    examples = subsample(task.split(split), max_examples, seed)
    if not examples:
        raise ValueError(f"task {task.name!r} has no {split!r} examples to evaluate")
    length = max_length or task.max_length
    log.info("evaluating %s on %d %s examples", task.name, len(examples), split)
    if task.kind == "classification":
        return scores_by_label_words(
            examples,
            tokenizer,
            logits_fn,
            task.label_words or [],
            batch_size=batch_size,
            max_length=length,
            progress=progress,
        )
    if task.kind == "dialogue":
        ppl = perplexity(
            examples, tokenizer, logits_fn, batch_size=batch_size, max_length=length, progress=progress
        )
        return {"perplexity": ppl}
    if generate_fn is None:
        raise ValueError(f"task {task.name!r} ({task.kind}) is scored on generated text: pass generate_fn")
    preds = generate_answers(
        examples,
        tokenizer,
        generate_fn,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        max_length=length,
        first_line=task.kind == "qa",
        progress=progress,
    )
    refs = [ex.references() for ex in examples]
    if task.kind == "qa":
        return qa_scores(preds, refs)
    return rouge_scores(preds, refs)
