"""Data sets, prompt formatting and metrics.

The task layer knows nothing about how the model is split: it reaches the model only through a
``LogitsFn`` (left-padded ids + pad lengths → logits) and a ``GenerateFn`` (prompt ids → new ids).
See docs/tasks.md.
"""

from .base import Example, Task, TaskError
from .benchmarks import HF_TASKS, HFSpec
from .evaluate import GenerateFn, decode_answer, evaluate, generate_answers
from .hf import load_hf_task
from .jsonl import load_jsonl
from .metrics import (
    LogitsFn,
    accuracy_by_label_words,
    answer_log_likelihoods,
    classification_scores,
    exact_match,
    normalize_answer,
    perplexity,
    predict_label_words,
    qa_scores,
    rouge_scores,
    scores_by_label_words,
    token_f1,
)
from .offline import load_dialogue, load_sentiment, load_summarization
from .partition import label_histogram, label_skew, partition, partition_indices
from .prompts import (
    IGNORE_INDEX,
    Encoded,
    collate,
    encode_example,
    encode_prompt,
    format_prompt,
    iterate_batches,
    pad_id_of,
)
from .registry import TASKS, load_task

__all__ = [
    "HF_TASKS",
    "IGNORE_INDEX",
    "TASKS",
    "Encoded",
    "Example",
    "GenerateFn",
    "HFSpec",
    "LogitsFn",
    "Task",
    "TaskError",
    "accuracy_by_label_words",
    "classification_scores",
    "answer_log_likelihoods",
    "collate",
    "decode_answer",
    "encode_example",
    "encode_prompt",
    "evaluate",
    "exact_match",
    "format_prompt",
    "generate_answers",
    "iterate_batches",
    "label_histogram",
    "label_skew",
    "load_dialogue",
    "load_hf_task",
    "load_jsonl",
    "load_sentiment",
    "load_summarization",
    "load_task",
    "normalize_answer",
    "pad_id_of",
    "partition",
    "partition_indices",
    "perplexity",
    "predict_label_words",
    "scores_by_label_words",
    "qa_scores",
    "rouge_scores",
    "token_f1",
]
