"""What each Hugging Face benchmark looks like: its hub id, its real field names and how a row becomes
Examples. Loading lives in ``hf.py``."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from .base import Example, squeeze_spaces, truncate_words

RowFn = Callable[[dict[str, Any], int], list[Example]]
YES_NO = ["no", "yes"]


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
        HFSpec(
            "boolq",
            "aps/super_glue",
            "boolq",
            "classification",
            boolq_examples,
            YES_NO,
            max_length=384,
            description="SuperGLUE BoolQ: yes/no questions about a passage",
        ),
        HFSpec(
            "multirc",
            "aps/super_glue",
            "multirc",
            "classification",
            multirc_examples,
            YES_NO,
            group_column="idx",
            group_key=lambda idx: idx["paragraph"],
            max_length=512,
            description="SuperGLUE MultiRC: is this candidate answer correct?",
        ),
        HFSpec(
            "record",
            "aps/super_glue",
            "record",
            "qa",
            record_examples,
            group_column="idx",
            group_key=lambda idx: idx["passage"],
            max_length=512,
            description="SuperGLUE ReCoRD: cloze-style entity answer",
        ),
        HFSpec(
            "coqa",
            "stanfordnlp/coqa",
            None,
            "qa",
            coqa_examples,
            max_length=512,
            description="CoQA: conversational question answering about a story",
        ),
        HFSpec(
            "xsum",
            "EdinburghNLP/xsum",
            None,
            "generation",
            _summary_examples("document", "summary", "Summarize the article above in one sentence."),
            max_length=640,
            description="XSum: one-sentence news summary",
        ),
        HFSpec(
            "cnn_dailymail",
            "abisee/cnn_dailymail",
            "3.0.0",
            "generation",
            _summary_examples("article", "highlights", "Write the highlights of the article above."),
            max_length=768,
            description="CNN/DailyMail: news highlights",
        ),
        HFSpec(
            "sst2",
            "nyu-mll/glue",
            "sst2",
            "classification",
            sst2_examples,
            ["negative", "positive"],
            max_length=128,
            description="GLUE SST-2: movie-review sentence sentiment",
        ),
    )
}
