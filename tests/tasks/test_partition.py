"""Splitting a training set among clients."""

from __future__ import annotations

import logging

import pytest

from fedsplit.tasks import Example, label_skew, partition


def _labelled(n=600, n_labels=3):
    return [Example(f"p{i}", f"c{i}", label=i % n_labels) for i in range(n)]


def _ids(parts):
    return [[ex.prompt for ex in part] for part in parts]


def _covers_once(parts, examples):
    flat = [ex.prompt for part in parts for ex in part]
    return sorted(flat) == sorted(ex.prompt for ex in examples)


def test_iid_sizes_differ_by_at_most_one_and_cover_everything():
    examples = _labelled(103)
    parts = partition(examples, 7, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and _covers_once(parts, examples)
    assert _ids(parts) == _ids(partition(examples, 7, "iid", seed=0))
    assert _ids(parts) != _ids(partition(examples, 7, "iid", seed=1))


@pytest.mark.parametrize("alpha", [0.01, 0.1, 1.0, 100.0])
def test_dirichlet_is_deterministic_covers_all_once_and_leaves_no_client_empty(alpha):
    examples = _labelled()
    parts = partition(examples, 10, f"dirichlet:{alpha}", seed=4)
    assert len(parts) == 10 and all(parts)
    assert _covers_once(parts, examples)
    assert _ids(parts) == _ids(partition(examples, 10, f"dirichlet:{alpha}", seed=4))


def test_small_alpha_is_more_skewed_than_large_alpha():
    examples = _labelled()
    skew = {
        alpha: label_skew(partition(examples, 8, f"dirichlet:{alpha}", seed=0), 3) for alpha in (0.1, 100.0)
    }
    assert skew[0.1] > 0.3 and skew[100.0] < 0.1


def test_dirichlet_without_labels_falls_back_to_iid_with_a_warning(caplog):
    examples = [Example(f"p{i}", "c") for i in range(20)]
    with caplog.at_level(logging.WARNING):
        parts = partition(examples, 3, "dirichlet:0.5", seed=0)
    assert "falling back to IID" in caplog.text
    assert _ids(parts) == _ids(partition(examples, 3, "iid", seed=0))


def test_every_client_gets_an_example_even_with_as_many_clients_as_examples():
    examples = _labelled(12)
    assert all(len(p) == 1 for p in partition(examples, 12, "dirichlet:0.01", seed=0))


@pytest.mark.parametrize("scheme", ["dirichlet", "dirichlet:-1", "dirichlet:x", "shards:2", "iid:3"])
def test_bad_scheme_is_a_clear_error(scheme):
    with pytest.raises(ValueError, match="dirichlet:ALPHA|positive concentration"):
        partition(_labelled(10), 2, scheme)


def test_more_clients_than_examples_is_an_error():
    with pytest.raises(ValueError, match="at least one example"):
        partition(_labelled(3), 4)
