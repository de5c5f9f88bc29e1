"""Hugging Face loaders on tiny fixtures written in the on-disk format of ``save_to_disk``, with each
benchmark's real field names (no network)."""

from __future__ import annotations

import pytest

datasets = pytest.importorskip("datasets")

from fedsplit.tasks import TaskError, load_task  # noqa: E402 - after the importorskip

N = 10


def _save(tmp_path, columns: dict) -> str:
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict(columns).save_to_disk(str(folder))
    return str(folder)


def _all(task):
    return task.train + task.val + task.test


def test_boolq_from_save_to_disk(tmp_path):
    path = _save(
        tmp_path,
        {
            "question": [f"is thing {i} true" for i in range(N)],
            "passage": [f"Passage number {i} about the thing." for i in range(N)],
            "idx": list(range(N)),
            "label": [i % 2 for i in range(N)],
        },
    )
    task = load_task("boolq", path=path)
    assert task.kind == "classification" and task.label_words == ["no", "yes"]
    assert task.sizes() == {"train": 8, "val": 1, "test": 1}
    for ex in _all(task):
        i = int(ex.prompt.split("Passage number ")[1].split()[0])
        assert ex.label == i % 2 and ex.completion == ["no", "yes"][i % 2]
        assert f"is thing {i} true?" in ex.prompt


def test_multirc_keeps_each_paragraph_in_one_split(tmp_path):
    rows = [(p, q, a) for p in range(5) for q in range(2) for a in range(2)]
    path = _save(
        tmp_path,
        {
            "paragraph": [f"Paragraph {p} text." for p, _, _ in rows],
            "question": [f"Question {q}?" for _, q, _ in rows],
            "answer": [f"answer {a}" for _, _, a in rows],
            "idx": [{"paragraph": p, "question": q, "answer": a} for p, q, a in rows],
            "label": [a for _, _, a in rows],
        },
    )
    task = load_task("multirc", path=path)
    assert task.kind == "classification" and sum(task.sizes().values()) == len(rows)
    owner = {}
    for split in ("train", "val", "test"):
        for ex in getattr(task, split):
            paragraph = ex.prompt.split("Paragraph ")[1].split()[0]
            assert owner.setdefault(paragraph, split) == split
            assert "Candidate answer: answer" in ex.prompt


def test_record_keeps_all_answers(tmp_path):
    path = _save(
        tmp_path,
        {
            "passage": [f"Alice met Bob in city{i}.\n@highlight\nAlice and Bob" for i in range(N)],
            "query": ["@placeholder met Bob"] * N,
            "entities": [["Alice", "Bob", f"city{i}"] for i in range(N)],
            "entity_spans": [{"text": ["Alice", "Bob"], "start": [0, 10], "end": [5, 13]} for _ in range(N)],
            "answers": [["Alice", "Alice "] for _ in range(N)],
            "idx": [{"passage": i, "query": 0} for i in range(N)],
        },
    )
    task = load_task("record", path=path)
    assert task.kind == "qa" and task.metric == "f1"
    ex = task.train[0]
    assert ex.completion == "Alice" and ex.answers == ["Alice"]
    assert "@highlight" not in ex.prompt and "Candidates: Alice, Bob" in ex.prompt


def test_coqa_gives_one_example_per_turn_with_history(tmp_path):
    path = _save(
        tmp_path,
        {
            "source": ["wikipedia"] * N,
            "story": [f"Story {i}: the dog was brown." for i in range(N)],
            "questions": [["what colour was the dog?", "was it big?"] for _ in range(N)],
            "answers": [
                {"input_text": ["brown", "no"], "answer_start": [0, 5], "answer_end": [3, 9]}
                for _ in range(N)
            ],
        },
    )
    task = load_task("coqa", path=path)
    assert task.kind == "qa" and sum(task.sizes().values()) == 2 * N
    second = next(ex for ex in task.train if ex.completion == "no")
    assert "Q: what colour was the dog?\nA: brown\nQ: was it big?" in second.prompt


@pytest.mark.parametrize(
    ("name", "source", "target"),
    [("xsum", "document", "summary"), ("cnn_dailymail", "article", "highlights")],
)
def test_news_summarization_from_save_to_disk(tmp_path, name, source, target):
    path = _save(
        tmp_path,
        {
            source: [f"Article {i} " + "word " * 50 for i in range(N)],
            target: [f"Summary {i}." for i in range(N)],
            "id": [str(i) for i in range(N)],
        },
    )
    task = load_task(name, path=path, max_source_words=20)
    assert task.kind == "generation" and task.metric == "rougeL"
    for ex in _all(task):
        i = ex.completion.split()[1].rstrip(".")
        assert ex.prompt.startswith(f"Article: Article {i} word") and len(ex.prompt.split()) < 40


def test_sst2_from_save_to_disk(tmp_path):
    path = _save(
        tmp_path,
        {
            "sentence": [f"film {i}" for i in range(N)],
            "label": [i % 2 for i in range(N)],
            "idx": list(range(N)),
        },
    )
    task = load_task("sst2", path=path, max_examples=4)
    assert task.label_words == ["negative", "positive"]
    assert task.sizes() == {"train": 4, "val": 1, "test": 1}


def test_hidden_test_labels_use_validation_as_test_and_carve_val_from_train(tmp_path):
    def split(n, start, hidden=False):
        return datasets.Dataset.from_dict(
            {
                "sentence": [f"film {start + i}" for i in range(n)],
                "label": [-1 if hidden else i % 2 for i in range(n)],
                "idx": list(range(n)),
            }
        )

    folder = tmp_path / "glue"
    datasets.DatasetDict(
        {"train": split(20, 0), "validation": split(5, 100), "test": split(5, 200, True)}
    ).save_to_disk(str(folder))
    task = load_task("sst2", path=str(folder))
    assert task.sizes() == {"train": 18, "val": 2, "test": 5}
    assert {ex.prompt.split("film ")[1].split()[0] for ex in task.test} == {str(100 + i) for i in range(5)}


def test_folder_of_per_split_save_to_disk_folders(tmp_path):
    for name, n in (("train", 8), ("validation", 2), ("test", 3)):
        datasets.Dataset.from_dict(
            {"sentence": [f"{name} {i}" for i in range(n)], "label": [1] * n, "idx": list(range(n))}
        ).save_to_disk(str(tmp_path / "d" / name))
    assert load_task("sst2", path=str(tmp_path / "d")).sizes() == {"train": 8, "val": 2, "test": 3}


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(TaskError, match="does not exist"):
        load_task("xsum", path=str(tmp_path / "nowhere"))
