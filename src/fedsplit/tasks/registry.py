"""``load_task``: one entry point for every task by name."""

from __future__ import annotations

import logging
from typing import Any

from .base import Task, TaskError, check_max_examples
from .benchmarks import HF_TASKS
from .hf import load_hf_task
from .jsonl import load_jsonl
from .offline import load_dialogue, load_sentiment, load_summarization

log = logging.getLogger(__name__)

OFFLINE_TASKS: tuple[str, ...] = ("sentiment", "summarization", "dialogue", "jsonl")
TASKS: tuple[str, ...] = OFFLINE_TASKS + tuple(HF_TASKS)


def load_task(
    name: str,
    *,
    max_examples: int | None = None,
    seed: int = 0,
    path: str | None = None,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    **options: Any,
) -> Task:
    """Load task ``name`` (one of ``TASKS``) split into train/val/test.

    Args:
        name: "sentiment", "summarization", "dialogue" and "jsonl" need no network; "boolq", "multirc",
            "record", "coqa", "xsum", "cnn_dailymail" and "sst2" are read with Hugging Face datasets.
        max_examples: cap train to this many examples and val/test to ``max(1, max_examples // 4)``,
            each a seeded random subset.
        seed: drives every shuffle: the split of data sets without one, the subsets, the carved val split.
        path: a JSONL file or folder (jsonl, required); a ``save_to_disk`` folder, data file or hub id
            ``owner/name[:config]`` (Hugging Face tasks); another copy of the data (offline tasks).
        prompt_field, completion_field: field names of the JSONL records.
        **options: passed to the loader, e.g. ``max_source_words`` (summaries, passages),
            ``max_history_turns`` (dialogue), ``min_confidence`` (sentiment), ``kind`` (jsonl).

    Raises:
        TaskError (a ValueError): unknown name (the message lists the names), missing data, bad fields.
    """
    check_max_examples(max_examples)
    common: dict[str, Any] = {"max_examples": max_examples, "seed": seed, **options}
    if name == "sentiment":
        return load_sentiment(path=path, **common)
    if name == "summarization":
        return load_summarization(path=path, **common)
    if name == "dialogue":
        return load_dialogue(path=path, **common)
    if name == "jsonl":
        return load_jsonl(path, prompt_field=prompt_field, completion_field=completion_field, **common)
    if name in HF_TASKS:
        return load_hf_task(name, path=path, **common)
    raise TaskError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
