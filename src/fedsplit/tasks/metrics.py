"""Scores: text metrics (exact match, token F1, ROUGE) and model-based ones (label-word accuracy,
perplexity) that reach the model only through a ``LogitsFn``."""

from __future__ import annotations

import logging
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .base import Example
from .prompts import IGNORE_INDEX, Encoded, collate, encode_example, format_answer, pad_id_of, text_ids

log = logging.getLogger(__name__)

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(input_ids LongTensor[B, T] left-padded, pad_lengths LongTensor[B]) -> logits [B, T, V]."""

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


# --------------------------------------------------------------------------- text metrics


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _refs(ref: str | Sequence[str]) -> list[str]:
    refs = [ref] if isinstance(ref, str) else list(ref)
    if not refs:
        raise ValueError("at least one reference answer is needed")
    return refs


def exact_match(pred: str, ref: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals the normalised reference (any of them, if several), else 0.0."""
    return max(float(normalize_answer(pred) == normalize_answer(r)) for r in _refs(ref))


def _f1(pred: str, ref: str) -> float:
    pred_tokens, ref_tokens = normalize_answer(pred).split(), normalize_answer(ref).split()
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(pred: str, ref: str | Sequence[str]) -> float:
    """SQuAD token-overlap F1 of the normalised strings (best over several references)."""
    return max(_f1(pred, r) for r in _refs(ref))


def rouge_scores(preds: Sequence[str], refs: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (``rouge-score``, Porter stemming) over pairs; best reference per pair."""
    from rouge_score import rouge_scorer

    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    if not preds:
        raise ValueError("rouge_scores needs at least one prediction")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(preds, refs):
        scores = [scorer.score(r, pred) for r in _refs(ref)]
        for key in ROUGE_TYPES:
            totals[key] += max(s[key].fmeasure for s in scores)
    return {key: totals[key] / len(preds) for key in ROUGE_TYPES}


def qa_scores(preds: Sequence[str], refs: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Mean exact match and token F1 over pairs."""
    if len(preds) != len(refs) or not preds:
        raise ValueError(f"need equally many predictions and references, got {len(preds)} and {len(refs)}")
    return {
        "exact_match": sum(exact_match(p, r) for p, r in zip(preds, refs)) / len(preds),
        "f1": sum(token_f1(p, r) for p, r in zip(preds, refs)) / len(preds),
    }


# --------------------------------------------------------------------------- model-based scores


def _progress(total: int, enabled: bool, desc: str) -> Any:
    """A progress bar over examples (a silent no-op one when not ``enabled``); use it with ``with``."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ex", disable=not enabled)


@torch.no_grad()
def answer_log_likelihoods(
    encoded: Sequence[Encoded],
    logits_fn: LogitsFn,
    pad_id: int,
    *,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "scoring",
) -> list[tuple[float, int]]:
    """``(sum of log-probabilities, number of tokens)`` of the labelled tokens of each sequence.

    Sequences are batched by length (less padding) and results returned in input order.
    """
    results: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    with _progress(len(encoded), progress, desc) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = collate([encoded[i] for i in rows], pad_id)
            logits = logits_fn(batch["input_ids"], batch["pad_lengths"])
            targets = batch["labels"][:, 1:]
            mask = targets != IGNORE_INDEX
            # Only answer positions go through log_softmax: [N_answer, V] rather than [B, T, V].
            picked = torch.log_softmax(logits[:, :-1][mask].float(), dim=-1)
            token_lp = picked.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
            row_of = mask.nonzero()[:, 0]
            sums = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, row_of, token_lp.double())
            counts = mask.sum(dim=1)
            for j, i in enumerate(rows):
                results[i] = (float(sums[j]), int(counts[j]))
            bar.update(len(rows))
    return results


def _label_word_encoding(tokenizer: Any, prompt: str, word: str, max_length: int) -> Encoded:
    """The example ``prompt → word`` with labels kept only on the word's tokens (not the end-of-turn)."""
    enc = encode_example(tokenizer, Example(prompt, word), max_length)
    suffix = text_ids(tokenizer, format_answer(tokenizer, prompt, ""), bos=False)
    n_answer = len(enc.input_ids) - enc.prompt_length
    if suffix and n_answer > len(suffix) and enc.input_ids[-len(suffix) :] == suffix:
        enc.labels[-len(suffix) :] = [IGNORE_INDEX] * len(suffix)
    return enc


def predict_label_words(
    examples: Sequence[Example],
    tokenizer: Any,
    logits_fn: LogitsFn,
    label_words: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int = 256,
    progress: bool = False,
) -> list[int]:
    """For each example, the index of the label word with the highest log-likelihood as the assistant answer.

    No free generation: each label word is scored as the answer to the prompt (sum of its tokens'
    log-probabilities) and the best one wins.
    """
    if not label_words:
        raise ValueError("label_words is empty")
    encoded = [
        _label_word_encoding(tokenizer, ex.prompt, word, max_length)
        for ex in examples
        for word in label_words
    ]
    k = len(label_words)
    shared = [_single_token_choices(encoded[i * k : (i + 1) * k]) for i in range(len(examples))]
    if all(choice is not None for choice in shared):
        return _predict_from_shared_prefix(shared, logits_fn, pad_id_of(tokenizer), batch_size, progress)
    scores = answer_log_likelihoods(
        encoded, logits_fn, pad_id_of(tokenizer), batch_size=batch_size, progress=progress, desc="label words"
    )
    return [max(range(k), key=lambda w: scores[i * k + w][0]) for i in range(len(examples))]


def _single_token_choices(choices: Sequence[Encoded]) -> tuple[list[int], list[int]] | None:
    """``(prefix, candidate ids)`` when every label word is one scored token after the same prefix.

    Then one forward of the prefix scores all words at once: the log-likelihood of a one-token
    answer is the log-softmax at the prefix's last position (the model is causal, so what follows
    the word does not change it). None when the fast path does not apply.
    """
    prefix: list[int] | None = None
    candidates = []
    for enc in choices:
        scored = [i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX]
        if len(scored) != 1:
            return None
        position = scored[0]
        if prefix is None:
            prefix = enc.input_ids[:position]
        elif enc.input_ids[:position] != prefix:
            return None
        candidates.append(enc.labels[position])
    return (prefix, candidates) if prefix else None


@torch.no_grad()
def _predict_from_shared_prefix(
    shared: Sequence[tuple[list[int], list[int]]],
    logits_fn: LogitsFn,
    pad_id: int,
    batch_size: int,
    progress: bool,
) -> list[int]:
    preds = [0] * len(shared)
    order = sorted(range(len(shared)), key=lambda i: len(shared[i][0]))
    with _progress(len(shared), progress, "label words") as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = collate([Encoded(shared[i][0], [IGNORE_INDEX] * len(shared[i][0])) for i in rows], pad_id)
            last = torch.log_softmax(
                logits_fn(batch["input_ids"], batch["pad_lengths"])[:, -1].float(), dim=-1
            )
            for j, i in enumerate(rows):
                preds[i] = int(last[j, torch.tensor(shared[i][1])].argmax())
            bar.update(len(rows))
    return preds


def classification_scores(preds: Sequence[int], golds: Sequence[int]) -> dict[str, float]:
    """``accuracy`` and ``macro_f1`` (F1 averaged over the labels that are gold or predicted at least once).

    Macro-F1 exposes what accuracy hides on a skewed label set: a model that always answers the most
    common label scores that label's share in accuracy but only about ``2 * share / (1 + share) / k``
    in macro-F1 over ``k`` labels.
    """
    if len(preds) != len(golds) or not golds:
        raise ValueError("classification_scores needs as many predictions as gold labels, at least one")
    hits = Counter(p for p, g in zip(preds, golds) if p == g)
    predicted, gold = Counter(preds), Counter(golds)
    f1s = [2 * hits[label] / (predicted[label] + gold[label]) for label in predicted | gold]
    return {"accuracy": hits.total() / len(golds), "macro_f1": sum(f1s) / len(f1s)}


def scores_by_label_words(
    examples: Sequence[Example],
    tokenizer: Any,
    logits_fn: LogitsFn,
    label_words: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int = 256,
    progress: bool = False,
) -> dict[str, float]:
    """:func:`classification_scores` of the label word the model scores highest against the gold ``label``."""
    labelled = [ex for ex in examples if ex.label is not None]
    if not labelled:
        raise ValueError("scoring by label words needs examples with a label")
    preds = predict_label_words(
        labelled,
        tokenizer,
        logits_fn,
        label_words,
        batch_size=batch_size,
        max_length=max_length,
        progress=progress,
    )
    return classification_scores(preds, [ex.label for ex in labelled])


def accuracy_by_label_words(
    examples: Sequence[Example],
    tokenizer: Any,
    logits_fn: LogitsFn,
    label_words: Sequence[str],
    **kwargs: Any,
) -> float:
    """Fraction of examples whose gold ``label`` is the label word the model scores highest."""
    return scores_by_label_words(examples, tokenizer, logits_fn, label_words, **kwargs)["accuracy"]


def perplexity(
    examples: Sequence[Example],
    tokenizer: Any,
    logits_fn: LogitsFn,
    *,
    batch_size: int = 8,
    max_length: int = 256,
    progress: bool = False,
) -> float:
    """exp of the mean negative log-likelihood per answer token, pooled over all examples."""
    if not examples:
        raise ValueError("perplexity needs at least one example")
    encoded = [encode_example(tokenizer, ex, max_length) for ex in examples]
    scores = answer_log_likelihoods(
        encoded, logits_fn, pad_id_of(tokenizer), batch_size=batch_size, progress=progress, desc="perplexity"
    )
    total_lp = sum(lp for lp, _ in scores)
    total_tokens = sum(n for _, n in scores)
    if total_tokens == 0:
        raise ValueError("no answer tokens to score")
    return math.exp(-total_lp / total_tokens)
