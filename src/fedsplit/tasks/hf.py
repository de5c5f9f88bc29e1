"""Benchmarks read with Hugging Face ``datasets``: from the hub, the local HF cache, a ``save_to_disk`` folder
or a data file.

Every benchmark (see ``benchmarks.py``) keeps its real field names; a row maps to zero or more Examples (zero when the row has
no gold answer, e.g. the hidden-label test split of GLUE/SuperGLUE). Which splits are used:

* train, validation and test all labelled → used as they are;
* test missing or unlabelled → test = validation, val = 10% of train (by group);
* one split only (e.g. a ``Dataset.save_to_disk`` folder) → seeded 80/10/10 by group.

Rows that share a passage (MultiRC, ReCoRD) are one group, so no passage is in two splits.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .base import Example, Task, TaskError, eval_cap, finish_task, split_groups
from .benchmarks import HF_TASKS, HFSpec

log = logging.getLogger(__name__)

_DATA_FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}


def open_dataset(spec: HFSpec, path: str | None) -> dict[str, Any]:
    """The raw splits (name → ``datasets.Dataset``) from ``path`` or the hub.

    ``path`` may be a ``save_to_disk`` folder (Dataset or DatasetDict), a folder of per-split
    ``save_to_disk`` folders, a .json/.jsonl/.parquet/.csv file, or a hub id (``owner/name`` or
    ``owner/name:config``). Hub ids resolve from the local HF cache when offline.
    """
    try:
        import datasets
    except ImportError:
        raise TaskError(
            f"the {spec.name!r} task needs Hugging Face datasets: `pip install datasets`"
        ) from None
    local = Path(path).expanduser() if path else None
    if local is not None and local.exists():
        if local.is_file():
            builder = _DATA_FILE_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise TaskError(
                    f"{local}: unsupported file type; use {sorted(_DATA_FILE_BUILDERS)} or a folder"
                )
            loaded = datasets.load_dataset(builder, data_files=str(local))
        elif any((local / f).is_file() for f in ("dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(str(local))
        else:
            subdirs = [d for d in sorted(local.iterdir()) if (d / "state.json").is_file()]
            if not subdirs:
                raise TaskError(
                    f"{local} is not a datasets save_to_disk folder (no dataset_dict.json/state.json)"
                )
            loaded = {d.name: datasets.load_from_disk(str(d)) for d in subdirs}
    else:
        if path and (path.startswith((".", "/", "~")) or "\\" in path):
            raise TaskError(f"{spec.name}: path {path!r} does not exist")
        hub_id, config = spec.hub_id, spec.config
        if path:
            hub_id, _, cfg = path.partition(":")
            config = cfg or (spec.config if hub_id == spec.hub_id else None)
        try:
            loaded = datasets.load_dataset(hub_id, config)
        except Exception as err:  # noqa: BLE001 - any hub/cache failure gets the same advice
            raise TaskError(
                f"could not load {spec.name!r} from {hub_id!r}"
                + (f" (config {config!r})" if config else "")
                + f": {type(err).__name__}: {err}. Offline? Save it once where you have network with "
                f"`datasets.load_dataset({hub_id!r}{', ' + repr(config) if config else ''}).save_to_disk(DIR)` "
                "and pass path=DIR."
            ) from None
    if isinstance(loaded, datasets.Dataset):
        return {"all": loaded}
    return dict(loaded)


def _labelled(spec: HFSpec, ds: Any, probe: int = 20) -> bool:
    """True if any of the first ``probe`` rows has a gold answer."""
    n = min(probe, len(ds))
    return any(spec.to_examples(ds[i], spec.max_source_words) for i in range(n))


def _groups(spec: HFSpec, ds: Any) -> list[Hashable]:
    """The group key of every row (the row index when the spec or the data has no group column)."""
    if spec.group_column and spec.group_column in ds.column_names and spec.group_key is not None:
        return [spec.group_key(v) for v in ds[spec.group_column]]
    return list(range(len(ds)))


def _carve(spec: HFSpec, ds: Any, fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Row indices of ``ds`` split by group in the given proportions."""
    keys = _groups(spec, ds)
    return split_groups(list(range(len(ds))), fractions, seed, group=lambda i: keys[i])


def assign_splits(spec: HFSpec, raw: dict[str, Any], seed: int) -> dict[str, tuple[Any, list[int]]]:
    """Map the raw splits to train/val/test as (dataset, row indices); see the module docstring."""
    by_name = {_canonical(k): v for k, v in raw.items()}
    if len(raw) == 1 or "train" not in by_name:
        if len(raw) != 1:
            raise TaskError(f"{spec.name}: no 'train' split among {sorted(raw)}")
        ds = next(iter(raw.values()))
        train, val, test = _carve(spec, ds, (0.8, 0.1, 0.1), seed)
        return {"train": (ds, train), "val": (ds, val), "test": (ds, test)}
    train_ds = by_name["train"]
    val_ds = (
        by_name.get("val") if by_name.get("val") is not None and _labelled(spec, by_name["val"]) else None
    )
    test_ds = (
        by_name.get("test") if by_name.get("test") is not None and _labelled(spec, by_name["test"]) else None
    )
    if val_ds is not None and test_ds is not None:
        return {
            "train": (train_ds, list(range(len(train_ds)))),
            "val": (val_ds, list(range(len(val_ds)))),
            "test": (test_ds, list(range(len(test_ds)))),
        }
    if test_ds is None and val_ds is None:
        train, val, test = _carve(spec, train_ds, (0.8, 0.1, 0.1), seed)
        return {"train": (train_ds, train), "val": (train_ds, val), "test": (train_ds, test)}
    if test_ds is None:
        log.info(
            "%s: test split missing or unlabelled; testing on validation, val carved from train", spec.name
        )
        test_ds = val_ds
    train, val = _carve(spec, train_ds, (0.9, 0.1), seed)
    return {"train": (train_ds, train), "val": (train_ds, val), "test": (test_ds, list(range(len(test_ds))))}


def _canonical(split: str) -> str:
    return {"validation": "val", "valid": "val", "dev": "val"}.get(split, split)


def _rows(ds: Any, indices: list[int], chunk: int = 1000) -> Iterator[dict[str, Any]]:
    """Rows of ``ds`` in the order of ``indices``, read a chunk at a time."""
    for start in range(0, len(indices), chunk):
        yield from ds.select(indices[start : start + chunk])


def build_examples(
    spec: HFSpec, ds: Any, indices: list[int], cap: int | None, seed: int, max_source_words: int
) -> list[Example]:
    """Examples from the rows ``indices`` of ``ds`` in seeded random order, stopping at ``cap`` examples."""
    order = list(indices)
    random.Random(seed).shuffle(order)
    examples: list[Example] = []
    for row in _rows(ds, order):
        examples.extend(spec.to_examples(row, max_source_words))
        if cap is not None and len(examples) >= cap:
            return examples[:cap]
    return examples


def load_hf_task(
    name: str,
    *,
    max_examples: int | None = None,
    seed: int = 0,
    path: str | None = None,
    max_source_words: int | None = None,
) -> Task:
    """Load the Hugging Face benchmark ``name`` (a key of ``HF_TASKS``) as a Task.

    Only the rows needed for ``max_examples`` are converted, so capping a large corpus is cheap.
    ``max_source_words`` caps passages/articles (in words) before tokenization; default per task.
    """
    if name not in HF_TASKS:
        raise TaskError(f"unknown Hugging Face task {name!r}; choose one of {sorted(HF_TASKS)}")
    spec = HF_TASKS[name]
    words = spec.max_source_words if max_source_words is None else max_source_words
    raw = open_dataset(spec, path)
    assigned = assign_splits(spec, raw, seed)
    caps = {"train": max_examples, "val": eval_cap(max_examples), "test": eval_cap(max_examples)}
    splits = {
        split: build_examples(spec, ds, indices, caps[split], seed + i, words)
        for i, (split, (ds, indices)) in enumerate(assigned.items())
    }
    return finish_task(
        name,
        spec.kind,
        splits,
        max_examples=max_examples,
        seed=seed,
        label_words=spec.label_words,
        max_length=spec.max_length,
        description=spec.description,
        info={
            "source": path or f"{spec.hub_id}" + (f":{spec.config}" if spec.config else ""),
            "raw_splits": {k: len(v) for k, v in raw.items()},
            "max_source_words": words,
        },
    )
