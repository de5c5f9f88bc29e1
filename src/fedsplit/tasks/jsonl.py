"""The ``jsonl`` task: prompt/completion pairs from a local JSONL file, field names mappable."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .base import SPLIT_FRACTIONS, Example, Task, TaskError, finish_task, split_groups

log = logging.getLogger(__name__)


def read_jsonl(file: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (blank lines skipped); TaskError naming the line of a bad one."""
    records = []
    with file.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskError(f"{file}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise TaskError(f"{file}:{lineno}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


def load_jsonl(
    path: str | None,
    *,
    max_examples: int | None = None,
    seed: int = 0,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    kind: str = "generation",
) -> Task:
    """Prompt/completion pairs from a JSONL file, or a folder of ``train/val/test.jsonl`` files.

    A single file is split 80/10/10 by a seeded shuffle. In a folder, ``validation.jsonl`` may stand for
    ``val.jsonl``; a missing ``val`` or ``test`` file is carved from train. ``kind="classification"``
    treats the distinct completions as the label words (sorted); ``kind="qa"`` scores by token F1.
    """
    if not path:
        raise TaskError("the jsonl task needs path=... (a .jsonl file or a folder with train.jsonl)")
    if kind not in ("generation", "classification", "qa", "dialogue"):
        raise TaskError(f"kind must be generation, classification, qa or dialogue, got {kind!r}")
    root = Path(path)
    if root.is_dir():
        files = {"train": root / "train.jsonl", "val": root / "val.jsonl", "test": root / "test.jsonl"}
        if not files["val"].is_file():
            files["val"] = root / "validation.jsonl"
        if not files["train"].is_file():
            raise TaskError(f"{root} has no train.jsonl")
        records = {
            s: _pairs(f, prompt_field, completion_field) if f.is_file() else None for s, f in files.items()
        }
        train = records["train"]
        if records["test"] is None:
            train, records["test"] = split_groups(train, (0.9, 0.1), seed)
        if records["val"] is None:
            train, records["val"] = split_groups(train, (0.9, 0.1), seed + 1)
        pairs = {"train": train, "val": records["val"], "test": records["test"]}
    elif root.is_file():
        train, val, test = split_groups(_pairs(root, prompt_field, completion_field), SPLIT_FRACTIONS, seed)
        pairs = {"train": train, "val": val, "test": test}
    else:
        raise TaskError(f"jsonl path not found: {root}")
    label_words = None
    if kind == "classification":
        label_words = sorted({c for part in pairs.values() for _, c in part})
    splits = {
        s: [Example(p, c, label=label_words.index(c) if label_words else None) for p, c in part]
        for s, part in pairs.items()
    }
    return finish_task(
        "jsonl",
        kind,
        splits,
        max_examples=max_examples,
        seed=seed,
        label_words=label_words,
        description=f"prompt/completion pairs from {root.name}",
        info={"source": str(root), "prompt_field": prompt_field, "completion_field": completion_field},
    )


def _pairs(file: Path, prompt_field: str, completion_field: str) -> list[tuple[str, str]]:
    pairs = []
    for i, record in enumerate(read_jsonl(file), 1):
        for field_name in (prompt_field, completion_field):
            if field_name not in record:
                raise TaskError(
                    f"{file}: record {i} has no field {field_name!r} (fields: {sorted(record)}); "
                    "map yours with prompt_field=... / completion_field=..."
                )
        prompt, completion = record[prompt_field], record[completion_field]
        prompt = prompt if isinstance(prompt, str) else json.dumps(prompt)
        completion = completion if isinstance(completion, str) else json.dumps(completion)
        if completion.strip():
            pairs.append((prompt, completion.strip()))
    if not pairs:
        raise TaskError(f"{file}: no usable records")
    return pairs
