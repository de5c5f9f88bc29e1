"""The common data types of the task layer and the split/cap helpers every loader shares."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

KINDS = ("classification", "generation", "qa", "dialogue")
METRIC_OF_KIND = {"classification": "accuracy", "generation": "rougeL", "qa": "f1", "dialogue": "perplexity"}
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train/val/test shares where a data set has no split of its own


class TaskError(ValueError):
    """A task cannot be loaded as asked (unknown name, missing file, bad field names…)."""


@dataclass
class Example:
    """One prompt/answer pair. The prompt becomes the user turn, the completion the assistant turn."""

    prompt: str
    completion: str
    label: int | None = None  # class index for classification tasks
    answers: list[str] | None = None  # every accepted answer (QA); scored as the best match over them

    def references(self) -> list[str]:
        """The answers a prediction is scored against: ``answers`` if set, else ``[completion]``."""
        return list(self.answers) if self.answers else [self.completion]


@dataclass
class Task:
    """A named data set, already split, with what is needed to score it."""

    name: str
    kind: str  # "classification" | "generation" | "qa" | "dialogue"
    train: list[Example]
    val: list[Example]
    test: list[Example]
    label_words: list[str] | None = None  # classification only, e.g. ["negative", "neutral", "positive"]
    metric: str = ""  # "accuracy" | "rougeL" | "f1" | "perplexity"; empty -> the kind's default
    max_length: int = 256  # a token length that fits most examples whole (a hint for encode_example)
    description: str = ""
    info: dict[str, object] = field(default_factory=dict)  # provenance: source file or hub id, options

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TaskError(f"task kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "classification" and not self.label_words:
            raise TaskError(f"classification task {self.name!r} needs label_words")
        if not self.metric:
            self.metric = METRIC_OF_KIND[self.kind]

    def split(self, name: str) -> list[Example]:
        """The examples of split ``name`` ("train", "val"/"validation" or "test")."""
        name = "val" if name == "validation" else name
        if name not in SPLITS:
            raise TaskError(f"unknown split {name!r}; choose one of {SPLITS}")
        return getattr(self, name)

    def sizes(self) -> dict[str, int]:
        """Number of examples per split."""
        return {s: len(getattr(self, s)) for s in SPLITS}


def eval_cap(max_examples: int | None) -> int | None:
    """The cap for val and test given the train cap: ``max(1, max_examples // 4)``."""
    return None if max_examples is None else max(1, max_examples // 4)


def check_max_examples(max_examples: int | None) -> None:
    """Reject a cap that is not a positive integer."""
    if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
        raise TaskError(f"max_examples must be a positive integer or None, got {max_examples!r}")


def subsample(items: Sequence[T], n: int | None, seed: int) -> list[T]:
    """A seeded random subset of ``n`` items in their original order (all items if ``n`` is None)."""
    if n is None or n >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def split_groups(
    items: Sequence[T],
    fractions: Sequence[float],
    seed: int,
    group: Callable[[T], Hashable] | None = None,
) -> list[list[T]]:
    """Split ``items`` into ``len(fractions)`` parts by a seeded shuffle of their groups.

    Items sharing a group key (a conversation, a passage…) always land in the same part, so no
    group leaks across splits. With at least as many groups as parts every part gets one group.
    Each part lists its groups in shuffled order (items of one group stay together, in their
    original order), so the first items of a part are a random sample of it.
    """
    keys: list[Hashable] = []
    members: dict[Hashable, list[int]] = {}
    for i, item in enumerate(items):
        key = i if group is None else group(item)
        if key not in members:
            members[key] = []
            keys.append(key)
        members[key].append(i)
    random.Random(seed).shuffle(keys)
    counts = _part_counts(len(keys), fractions)
    parts: list[list[T]] = []
    start = 0
    for count in counts:
        parts.append([items[i] for key in keys[start : start + count] for i in members[key]])
        start += count
    return parts


def _part_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Integer sizes proportional to ``fractions`` summing to ``n``; later parts get at least one if possible."""
    total = sum(fractions)
    counts = [int(n * f / total) for f in fractions]
    counts[0] += n - sum(counts)
    # Tiny data sets: take one item from the first part for each empty later part.
    for i in range(1, len(counts)):
        if counts[i] == 0 and counts[0] > 1:
            counts[i] += 1
            counts[0] -= 1
    return counts


def finish_task(
    name: str,
    kind: str,
    splits: dict[str, list[Example]],
    *,
    max_examples: int | None,
    seed: int,
    label_words: list[str] | None = None,
    max_length: int = 256,
    description: str = "",
    info: dict[str, object] | None = None,
) -> Task:
    """Cap the splits (train to ``max_examples``, val/test to ``eval_cap``) and build the Task."""
    check_max_examples(max_examples)
    caps = {"train": max_examples, "val": eval_cap(max_examples), "test": eval_cap(max_examples)}
    capped = {s: subsample(splits[s], caps[s], seed + i) for i, s in enumerate(SPLITS)}
    for s in SPLITS:
        if not capped[s]:
            log.warning("task %s: split %r is empty", name, s)
    task = Task(
        name=name,
        kind=kind,
        train=capped["train"],
        val=capped["val"],
        test=capped["test"],
        label_words=label_words,
        metric=METRIC_OF_KIND[kind],
        max_length=max_length,
        description=description,
        info=dict(info or {}),
    )
    log.info("task %s loaded: %s", name, task.sizes())
    return task


def squeeze_spaces(text: str) -> str:
    """Collapse runs of whitespace to one space and strip the ends."""
    return " ".join(text.split())


def truncate_words(text: str, max_words: int | None) -> str:
    """The first ``max_words`` whitespace-separated words of ``text`` (all of it if None)."""
    if max_words is None:
        return text
    words = text.split()
    return text if len(words) <= max_words else " ".join(words[:max_words]) + " ..."
