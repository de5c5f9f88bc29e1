"""How well an attack did: token precision/recall/F1, ROUGE-L, BLEU-4, label accuracy and AUC.

Token scores follow VFLAIR-LLM: the recovered and the true sequence are compared as
bags (multisets) of token ids, so a token counts as recovered wherever it appears;
pad and special tokens are left out before counting. ROUGE-L and BLEU-4 compare the
decoded texts, as FL-LLaMA reports them. Batched inputs are scored per example and
averaged (macro), so a long sequence does not outweigh a short one.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Collection, Sequence

import numpy as np
import torch

_WORD = re.compile(r"\w+|[^\w\s]")


def _as_rows(ids) -> list[list[int]]:
    """A sequence of ids, a batch of them, or a tensor of either -> a list of rows of ints."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    ids = list(ids)
    if ids and isinstance(ids[0], (int, np.integer)):
        return [[int(i) for i in ids]]
    return [[int(i) for i in row] for row in ids]


def _prf_one(pred: list[int], true: list[int]) -> tuple[float, float, float]:
    overlap = sum((Counter(pred) & Counter(true)).values())
    precision = overlap / len(pred) if pred else 0.0
    recall = overlap / len(true) if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


def token_prf(pred_ids, true_ids, ignore: Collection[int] = ()) -> tuple[float, float, float]:
    """Bag-of-tokens precision, recall and F1 of recovered ids against the true ids.

    Args:
        pred_ids: recovered ids, one sequence (``[T]``) or a batch (``[B, T]``, list of lists or tensor).
        true_ids: the true ids, same layout (rows may differ in length from ``pred_ids``).
        ignore: ids dropped from both sides before counting (pad, BOS/EOS, chat-template tokens).

    Returns:
        ``(precision, recall, f1)``, averaged over rows for a batch. Overlap is the size of
        the multiset intersection, so a token recovered twice counts twice only if it
        occurs twice in the truth.
    """
    pred_rows, true_rows = _as_rows(pred_ids), _as_rows(true_ids)
    # An empty list is one empty sequence when the other side is one sequence.
    if not pred_rows and len(true_rows) == 1:
        pred_rows = [[]]
    if not true_rows and len(pred_rows) == 1:
        true_rows = [[]]
    if len(pred_rows) != len(true_rows):
        raise ValueError(f"{len(pred_rows)} predicted rows but {len(true_rows)} true rows")
    ignore = set(int(i) for i in ignore)
    scores = [
        _prf_one([i for i in p if i not in ignore], [i for i in t if i not in ignore])
        for p, t in zip(pred_rows, true_rows)
    ]
    if not scores:
        return 0.0, 0.0, 0.0
    return tuple(float(np.mean(column)) for column in zip(*scores))  # type: ignore[return-value]


def words(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens: the unit of ROUGE-L and BLEU-4 here."""
    return _WORD.findall(text.lower())


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(pred_text: str, ref_text: str) -> float:
    """ROUGE-L F1 (longest common subsequence of words) of ``pred_text`` against ``ref_text``."""
    pred, ref = words(pred_text), words(ref_text)
    if not pred or not ref:
        return 0.0
    lcs = _lcs(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def bleu4(pred_text: str, ref_text: str) -> float:
    """Sentence BLEU-4 with uniform weights, add-one smoothing of the 2..4-gram precisions and brevity penalty.

    Add-one smoothing for n > 1 (Lin & Och, 2004) keeps a short partial match from
    scoring exactly 0; with no unigram in common the score is 0.
    """
    pred, ref = words(pred_text), words(ref_text)
    if not pred or not ref:
        return 0.0
    log_precision = 0.0
    for n in range(1, 5):
        pred_ngrams = Counter(tuple(pred[i : i + n]) for i in range(len(pred) - n + 1))
        ref_ngrams = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
        matches = sum((pred_ngrams & ref_ngrams).values())
        total = max(len(pred) - n + 1, 0)
        if n == 1:
            if matches == 0:
                return 0.0
            precision = matches / total
        else:
            precision = (matches + 1) / (total + 1)
        log_precision += math.log(precision) / 4
    brevity = 1.0 if len(pred) > len(ref) else math.exp(1 - len(ref) / len(pred))
    return brevity * math.exp(log_precision)


def mean_text_scores(pred_texts: Sequence[str], ref_texts: Sequence[str]) -> tuple[float, float]:
    """Mean ROUGE-L and BLEU-4 over pairs of texts."""
    if len(pred_texts) != len(ref_texts):
        raise ValueError(f"{len(pred_texts)} predicted texts but {len(ref_texts)} references")
    if not pred_texts:
        return 0.0, 0.0
    rouge = float(np.mean([rouge_l(p, r) for p, r in zip(pred_texts, ref_texts)]))
    bleu = float(np.mean([bleu4(p, r) for p, r in zip(pred_texts, ref_texts)]))
    return rouge, bleu


def _binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Mann-Whitney U with average ranks for ties.
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=float)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def auc(scores, labels) -> float:
    """Area under the ROC curve, rank-based (ties count one half).

    Args:
        scores: ``[N]`` scores for the positive class (binary labels 0/1), or ``[N, K]``
            per-class scores for ``K`` classes (labels ``0..K-1``): one-vs-rest AUC of
            each class present in ``labels``, macro-averaged.
        labels: ``[N]`` integer labels.

    Returns:
        The AUC in [0, 1] (0.5 is chance), or ``nan`` if a class has no example.
    """
    scores = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=float)
    labels = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels).astype(int)
    if scores.ndim == 1:
        return _binary_auc(scores, labels == 1)
    per_class = [
        _binary_auc(scores[:, k], labels == k) for k in range(scores.shape[1]) if (labels == k).any()
    ]
    per_class = [a for a in per_class if not math.isnan(a)]
    return float(np.mean(per_class)) if per_class else float("nan")


def accuracy(pred_labels, labels) -> float:
    """Fraction of equal entries."""
    pred = np.asarray(pred_labels.cpu() if isinstance(pred_labels, torch.Tensor) else pred_labels)
    true = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    return float((pred == true).mean()) if len(true) else float("nan")
