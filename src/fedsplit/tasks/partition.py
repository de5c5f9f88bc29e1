"""Split a training set among clients: IID, or label-skewed by a Dirichlet draw per class."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from .base import Example

log = logging.getLogger(__name__)


def parse_scheme(scheme: str) -> tuple[str, float | None]:
    """``"iid"`` → ("iid", None); ``"dirichlet:0.5"`` → ("dirichlet", 0.5). ValueError otherwise."""
    name, _, arg = scheme.strip().lower().partition(":")
    if name == "iid" and not arg:
        return "iid", None
    if name == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            alpha = float("nan")
        if not alpha > 0 or not np.isfinite(alpha):
            raise ValueError(
                f"dirichlet needs a positive concentration, e.g. 'dirichlet:0.5'; got {scheme!r}"
            )
        return "dirichlet", alpha
    raise ValueError(
        f"unknown partition scheme {scheme!r}; use 'iid' or 'dirichlet:ALPHA' (e.g. 'dirichlet:0.5')"
    )


def iid_indices(n: int, n_clients: int, rng: np.random.Generator) -> list[list[int]]:
    """A random permutation of ``range(n)`` cut into ``n_clients`` parts whose sizes differ by at most one."""
    return [part.tolist() for part in np.array_split(rng.permutation(n), n_clients)]


def dirichlet_indices(
    labels: Sequence[int], n_clients: int, alpha: float, rng: np.random.Generator, max_tries: int = 100
) -> list[list[int]]:
    """Label-skewed parts: each class is spread over clients by proportions drawn from Dir(alpha).

    Small ``alpha`` gives each client few classes; large ``alpha`` approaches IID. Draws are repeated
    (up to ``max_tries``) until every client has an example; if that still fails, the largest clients
    give one example each to the empty ones.
    """
    labels_arr = np.asarray(labels)
    classes = np.unique(labels_arr)
    parts: list[list[int]] = [[] for _ in range(n_clients)]
    for _ in range(max_tries):
        parts = [[] for _ in range(n_clients)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels_arr == c))
            shares = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].extend(chunk.tolist())
        if all(parts):
            break
    else:
        log.debug(
            "dirichlet(alpha=%g): moving examples to clients left empty after %d draws", alpha, max_tries
        )
        for empty in [i for i, p in enumerate(parts) if not p]:
            donor = max(range(n_clients), key=lambda i: len(parts[i]))
            parts[empty].append(parts[donor].pop())
    return [rng.permutation(p).tolist() for p in parts]


def partition_indices(
    labels: Sequence[int | None], n_clients: int, scheme: str = "iid", *, seed: int = 0
) -> list[list[int]]:
    """Client index lists for items with these labels (see ``partition``)."""
    n = len(labels)
    if not isinstance(n_clients, int) or n_clients < 1:
        raise ValueError(f"n_clients must be a positive integer, got {n_clients!r}")
    if n < n_clients:
        raise ValueError(f"cannot give {n_clients} clients at least one example each from {n} examples")
    name, alpha = parse_scheme(scheme)
    rng = np.random.default_rng(seed)
    if name == "dirichlet":
        if any(label is None for label in labels):
            log.warning("partition %r: the examples have no labels; falling back to IID", scheme)
        else:
            return dirichlet_indices([int(label) for label in labels], n_clients, float(alpha), rng)
    return iid_indices(n, n_clients, rng)


def partition(
    examples: Sequence[Example], n_clients: int, scheme: str = "iid", *, seed: int = 0
) -> list[list[Example]]:
    """Split ``examples`` among ``n_clients``: each example goes to exactly one client, none is empty.

    ``scheme`` is ``"iid"`` (sizes differ by at most one) or ``"dirichlet:ALPHA"`` (label skew; tasks
    without labels fall back to IID with a warning). The same seed gives the same split.
    """
    parts = partition_indices([ex.label for ex in examples], n_clients, scheme, seed=seed)
    return [[examples[i] for i in part] for part in parts]


def label_histogram(parts: Sequence[Sequence[Example]], n_labels: int) -> np.ndarray:
    """Counts per client and label, shape [n_clients, n_labels] (unlabelled examples are not counted)."""
    counts = np.zeros((len(parts), n_labels), dtype=np.int64)
    for client, part in enumerate(parts):
        for ex in part:
            if ex.label is not None:
                counts[client, ex.label] += 1
    return counts


def label_skew(parts: Sequence[Sequence[Example]], n_labels: int) -> float:
    """Mean total-variation distance between each client's label distribution and the overall one (0 = IID)."""
    counts = label_histogram(parts, n_labels).astype(float)
    overall = counts.sum(0) / max(counts.sum(), 1.0)
    per_client = counts / np.maximum(counts.sum(1, keepdims=True), 1.0)
    return float(0.5 * np.abs(per_client - overall).sum(1).mean())
