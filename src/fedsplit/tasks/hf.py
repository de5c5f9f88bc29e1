"""Benchmarks read with Hugging Face ``datasets``: from the hub, the local HF cache, a ``save_to_disk`` folder
or a data file.

Every benchmark keeps its real field names; a row maps to zero or more Examples (zero when the row has
no gold answer, e.g. the hidden-label test split of GLUE/SuperGLUE). Which splits are used:

* train, validation and test all labelled → used as they are;
* test missing or unlabelled → test = validation, val = 10% of train (by group);
* one split only (e.g. a ``Dataset.save_to_disk`` folder) → seeded 80/10/10 by group.

Rows that share a passage (MultiRC, ReCoRD) are one group, so no passage is in two splits.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import Example, Task, TaskError, eval_cap, finish_task, split_groups, squeeze_spaces, truncate_words

log = logging.getLogger(__name__)

RowFn = Callable[[dict[str, Any], int], list[Example]]
YES_NO = ["no", "yes"]
_DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


@dataclass(frozen=True)
class HFSpec:
    """How one benchmark is found and turned into Examples."""

    name: str
    hub_id: str
    config: str | None
    kind: str
    to_examples: RowFn  # (row, max_source_words) -> examples
    label_words: list[str] | None = None
    group_column: str | None = None  # rows with equal group keys stay in one split
    group_key: Callable[[Any], Hashable] | None = None
    max_length: int = 256
    max_source_words: int = 400
    description: str = ""


def _yes_no_label(row: dict[str, Any]) -> int | None:
    """0/1 from SuperGLUE's ``label`` or google/boolq's boolean ``answer``; None if hidden (-1)."""
    if "label" in row:
        label = row["label"]
    elif "answer" in row and isinstance(row["answer"], bool):
        label = int(row["answer"])
    else:
        return None
    return None if label is None or int(label) < 0 else int(label)


def _question(text: str) -> str:
    text = squeeze_spaces(text)
    return text if text.endswith("?") else text + "?"


def boolq_examples(row: dict[str, Any], max_source_words: int) -> list[Example]:
    """BoolQ: passage + yes/no question (fields ``question``, ``passage``, ``label`` or ``answer``)."""
    label = _yes_no_label(row)
    if label is None:
        return []
    passage = truncate_words(squeeze_spaces(row["passage"]), max_source_words)
    prompt = f"Passage: {passage}\n\nQuestion: {_question(row['question'])}\nAnswer yes or no."
    return [Example(prompt, YES_NO[label], label=label)]


def multirc_examples(row: dict[str, Any], max_source_words: int) -> list[Example]:
    """MultiRC: is a candidate answer to a question about a paragraph correct (``paragraph``, ``question``,
    ``answer``, ``label``)?"""
    label = row.get("label")
    if label is None or int(label) < 0:
        return []
    paragraph = truncate_words(squeeze_spaces(str(row["paragraph"]).replace("<br>", " ")), max_source_words)
    prompt = (
        f"Passage: {paragraph}\n\nQuestion: {squeeze_spaces(row['question'])}\n"
        f"Candidate answer: {squeeze_spaces(row['answer'])}\nIs the candidate answer correct? Answer yes or no."
    )
    return [Example(prompt, YES_NO[int(label)], label=int(label))]


def record_examples(row: dict[str, Any], max_source_words: int) -> list[Example]:
    """ReCoRD: which entity fills ``@placeholder`` in the query (``passage``, ``query``, ``entities``,
    ``answers``)? Every gold answer counts."""
    answers = list(dict.fromkeys(a.strip() for a in row.get("answers") or [] if a and a.strip()))
    if not answers:
        return []
    passage = str(row["passage"]).replace("@highlight\n", "- ")
    passage = truncate_words(passage, max_source_words)
    entities = ", ".join(dict.fromkeys(e.strip() for e in row.get("entities") or []))
    prompt = (
        f"Passage: {passage}\n\nQuery: {squeeze_spaces(row['query'])}\n"
        + (f"Candidates: {entities}\n" if entities else "")
        + "Which entity should replace @placeholder in the query? Answer with the entity only."
    )
    return [Example(prompt, answers[0], answers=answers)]


def coqa_examples(row: dict[str, Any], max_source_words: int, max_history_turns: int = 3) -> list[Example]:
    """CoQA: one example per question of a story's conversation (``story``, ``questions``,
    ``answers.input_text``), with up to ``max_history_turns`` earlier question/answer pairs."""
    story = truncate_words(squeeze_spaces(row["story"]), max_source_words)
    questions = list(row.get("questions") or [])
    answers = list((row.get("answers") or {}).get("input_text") or [])
    examples = []
    for i, (question, answer) in enumerate(zip(questions, answers)):
        answer = squeeze_spaces(answer)
        if not answer:
            continue
        history = "".join(
            f"Q: {squeeze_spaces(q)}\nA: {squeeze_spaces(a)}\n"
            for q, a in list(zip(questions, answers))[max(0, i - max_history_turns) : i]
        )
        prompt = f"Story: {story}\n\n{history}Q: {squeeze_spaces(question)}\nAnswer in a few words."
        examples.append(Example(prompt, answer, answers=[answer]))
    return examples


def _summary_examples(source_field: str, target_field: str, instruction: str) -> RowFn:
    def to_examples(row: dict[str, Any], max_source_words: int) -> list[Example]:
        target = "\n".join(squeeze_spaces(line) for line in str(row.get(target_field) or "").splitlines())
        target = target.strip()
        if not target:
            return []
        source = truncate_words(squeeze_spaces(str(row[source_field])), max_source_words)
        return [Example(f"Article: {source}\n\n{instruction}", target)]

    to_examples.__doc__ = f"Summarization: ``{source_field}`` → ``{target_field}``."
    return to_examples


def sst2_examples(row: dict[str, Any], max_source_words: int) -> list[Example]:
    """GLUE SST-2: binary sentiment of a movie-review sentence (``sentence``, ``label``)."""
    label = row.get("label")
    if label is None or int(label) < 0:
        return []
    text = truncate_words(squeeze_spaces(row["sentence"]), max_source_words)
    prompt = f"Text: {text}\n\nIs the sentiment of this text negative or positive? Answer with one word."
    return [Example(prompt, ["negative", "positive"][int(label)], label=int(label))]


HF_TASKS: dict[str, HFSpec] = {
    spec.name: spec
    for spec in (
        HFSpec("boolq", "aps/super_glue", "boolq", "classification", boolq_examples, YES_NO,
               max_length=384, description="SuperGLUE BoolQ: yes/no questions about a passage"),
        HFSpec("multirc", "aps/super_glue", "multirc", "classification", multirc_examples, YES_NO,
               group_column="idx", group_key=lambda idx: idx["paragraph"], max_length=512,
               description="SuperGLUE MultiRC: is this candidate answer correct?"),
        HFSpec("record", "aps/super_glue", "record", "qa", record_examples,
               group_column="idx", group_key=lambda idx: idx["passage"], max_length=512,
               description="SuperGLUE ReCoRD: cloze-style entity answer"),
        HFSpec("coqa", "stanfordnlp/coqa", None, "qa", coqa_examples, max_length=512,
               description="CoQA: conversational question answering about a story"),
        HFSpec("xsum", "EdinburghNLP/xsum", None, "generation",
               _summary_examples("document", "summary", "Summarize the article above in one sentence."),
               max_length=640, description="XSum: one-sentence news summary"),
        HFSpec("cnn_dailymail", "abisee/cnn_dailymail", "3.0.0", "generation",
               _summary_examples("article", "highlights", "Write the highlights of the article above."),
               max_length=768, description="CNN/DailyMail: news highlights"),
        HFSpec("sst2", "nyu-mll/glue", "sst2", "classification", sst2_examples, ["negative", "positive"],
               max_length=128, description="GLUE SST-2: movie-review sentence sentiment"),
    )
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
        raise TaskError(f"the {spec.name!r} task needs Hugging Face datasets: `pip install datasets`") from None
    local = Path(path).expanduser() if path else None
    if local is not None and local.exists():
        if local.is_file():
            builder = _DATA_FILE_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise TaskError(f"{local}: unsupported file type; use {sorted(_DATA_FILE_BUILDERS)} or a folder")
            loaded = datasets.load_dataset(builder, data_files=str(local))
        elif any((local / f).is_file() for f in ("dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(str(local))
        else:
            subdirs = [d for d in sorted(local.iterdir()) if (d / "state.json").is_file()]
            if not subdirs:
                raise TaskError(f"{local} is not a datasets save_to_disk folder (no dataset_dict.json/state.json)")
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
    val_ds = by_name.get("val") if by_name.get("val") is not None and _labelled(spec, by_name["val"]) else None
    test_ds = by_name.get("test") if by_name.get("test") is not None and _labelled(spec, by_name["test"]) else None
    if val_ds is not None and test_ds is not None:
        return {"train": (train_ds, list(range(len(train_ds)))), "val": (val_ds, list(range(len(val_ds)))),
                "test": (test_ds, list(range(len(test_ds))))}
    if test_ds is None and val_ds is None:
        train, val, test = _carve(spec, train_ds, (0.8, 0.1, 0.1), seed)
        return {"train": (train_ds, train), "val": (train_ds, val), "test": (train_ds, test)}
    if test_ds is None:
        log.info("%s: test split missing or unlabelled; testing on validation, val carved from train", spec.name)
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
        name, spec.kind, splits, max_examples=max_examples, seed=seed, label_words=spec.label_words,
        max_length=spec.max_length, description=spec.description,
        info={"source": path or f"{spec.hub_id}" + (f":{spec.config}" if spec.config else ""),
              "raw_splits": {k: len(v) for k, v in raw.items()}, "max_source_words": words},
    )
