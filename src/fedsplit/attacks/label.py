"""Label inference from the gradients the server receives during training.

With an answer-only loss, the gradient w.r.t. the body output at the position that
predicts the answer is, up to the tail's Jacobian, ``softmax(logits) - onehot(answer)``:
its *norm* tells how surprised the model was by the label (Li et al., "Label Leakage
and Protection in Two-party Split Learning", ICLR 2022) and its *direction* points
away from the label word's output embedding, so gradients of examples with the same
label cluster together (the cosine/direction attacks of the same line of work).

The server can locate that position itself: it is where the gradient is largest.
Three ways to turn the per-example feature into a label:

* ``norm`` (binary): score = gradient norm; which side is which, and the threshold,
  come from a handful of examples whose labels the attacker knows.
* ``cluster``: k-means (cosine, in torch) with k = number of classes; clusters are
  matched to labels on the known examples (Hungarian assignment).
* ``classifier``: softmax regression on the known examples' normalised gradients.

:func:`victim_gradients` produces realistic gradients in-process: the client's real
training batch (prompt + label word, answer-only loss) through head, body and tail.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .result import AttackResult

log = logging.getLogger(__name__)

LABEL_METHODS = ("auto", "norm", "cluster", "classifier")


def victim_gradients(
    head: nn.Module,
    body: nn.Module,
    tail: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    pad_lengths: torch.Tensor,
    *,
    defense: nn.Module | None = None,
    grad_defense=None,
    batch_size: int = 8,
    progress: bool = True,
) -> torch.Tensor:
    """The gradient w.r.t. the body output that the client sends back, per example: ``[N, T, H]``.

    Runs the client's training forward (head -> defence -> body -> tail, next-token loss
    on the answer only, mean over each batch of ``batch_size`` as a training step does)
    and captures the gradient of the tail's input, after ``grad_defense`` if given.
    Model parameters get no gradient; nothing is updated. The inputs may sit anywhere: they
    go to the head's device; the gradients come back on the CPU in fp32, for the attacker's analysis.
    """
    from ..client.core import lm_loss

    grads = []
    device = next(head.parameters()).device
    modules = [m for m in (head, body, tail, defense) if m is not None]
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        starts = range(0, input_ids.shape[0], batch_size)
        for s in tqdm(starts, desc="victim gradients", disable=not progress, leave=False):
            ids, lab, pad = (t[s : s + batch_size].to(device) for t in (input_ids, labels, pad_lengths))
            with torch.no_grad():
                hidden = head(ids, pad)
                if defense is not None:
                    hidden = defense(hidden, pad)
                received = body(hidden, pad)
            received = received.detach().requires_grad_(True)
            lm_loss(tail(received, pad), lab).backward()
            grad = received.grad.detach()
            grads.append((grad_defense(grad) if grad_defense is not None else grad).float().cpu())
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    width = max(g.shape[1] for g in grads)
    # Rows are left-padded per batch: left-pad the batches to one width.
    return torch.cat([F.pad(g, (0, 0, width - g.shape[1], 0)) for g in grads])


def gradient_features(grads: torch.Tensor) -> torch.Tensor:
    """Per example, the gradient vector at the position where its norm is largest: ``[N, H]``."""
    norms = grads.norm(dim=-1)  # [N, T]
    where = norms.argmax(dim=1)
    return grads[torch.arange(grads.shape[0]), where]


def kmeans(
    x: torch.Tensor, k: int, *, iters: int = 50, restarts: int = 5, cosine: bool = True, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means with k-means++ seeding and a few restarts: ``(assignments [N], centroids [k, D])``.

    With ``cosine`` the points and centroids are kept on the unit sphere (spherical k-means).
    The restart with the lowest within-cluster cost wins.
    """
    x = x.detach().float()
    if cosine:
        x = F.normalize(x, dim=-1)
    if k < 1 or k > len(x):
        raise ValueError(f"k must be in [1, {len(x)}], got {k}")
    generator = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(restarts):
        centroids = x[torch.randint(len(x), (1,), generator=generator)]
        while len(centroids) < k:
            d2 = torch.cdist(x, centroids).pow(2).min(dim=1).values
            probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(d2))
            centroids = torch.cat([centroids, x[torch.multinomial(probs, 1, generator=generator)]])
        for _ in range(iters):
            assign = torch.cdist(x, centroids).argmin(dim=1)
            new = torch.stack(
                [x[assign == j].mean(0) if (assign == j).any() else centroids[j] for j in range(k)]
            )
            if cosine:
                new = F.normalize(new, dim=-1)
            if torch.allclose(new, centroids):
                break
            centroids = new
        assign = torch.cdist(x, centroids).argmin(dim=1)
        cost = float((x - centroids[assign]).pow(2).sum())
        if best is None or cost < best[0]:
            best = (cost, assign, centroids)
    return best[1], best[2]


def match_clusters(assign: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Map cluster -> label maximising agreement on labelled points: ``LongTensor[k]``.

    Exhaustive over permutations for k <= 7 (that is the Hungarian optimum); a greedy
    majority vote for larger k.
    """
    counts = np.zeros((k, k))
    for a, y in zip(assign.tolist(), labels.tolist()):
        counts[a, y] += 1
    if k <= 7:
        best = max(
            itertools.permutations(range(k)), key=lambda perm: sum(counts[c, perm[c]] for c in range(k))
        )
        return torch.tensor(best, dtype=torch.long)
    return torch.tensor(counts.argmax(axis=1), dtype=torch.long)


def _fit_softmax(x: torch.Tensor, y: torch.Tensor, k: int, steps: int = 200, seed: int = 0) -> nn.Linear:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Linear(x.shape[1], k)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def infer_labels(
    victim_grads: torch.Tensor,
    num_classes: int,
    aux_grads: torch.Tensor,
    aux_labels: torch.Tensor,
    *,
    method: str = "auto",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Guess the label of each victim example from its gradient.

    Args:
        victim_grads: ``[N, T, H]`` gradients (or ``[N, H]`` features) of the examples attacked.
        num_classes: number of labels.
        aux_grads: gradients (or features) of a few examples whose labels the attacker knows.
        aux_labels: their labels ``[M]`` in ``0..num_classes-1``.
        method: ``"norm"`` (binary only), ``"cluster"``, ``"classifier"``, or ``"auto"``
            (``norm`` when binary, ``cluster`` otherwise).

    Returns:
        ``(predicted labels [N], scores)``: scores are ``[N]`` (positive class) when binary
        with ``norm``, else ``[N, num_classes]``; feed them to :func:`~fedsplit.attacks.metrics.auc`.
    """
    if method not in LABEL_METHODS:
        raise ValueError(f"label method must be one of {LABEL_METHODS}, got {method!r}")
    if method == "auto":
        method = "norm" if num_classes == 2 else "cluster"
    feats = gradient_features(victim_grads) if victim_grads.dim() == 3 else victim_grads
    aux = gradient_features(aux_grads) if aux_grads.dim() == 3 else aux_grads
    feats, aux, aux_labels = feats.float(), aux.float(), aux_labels.long()

    if method == "norm":
        if num_classes != 2:
            raise ValueError("the norm attack is for binary labels; use 'cluster' or 'classifier'")
        scores, aux_scores = feats.norm(dim=-1), aux.norm(dim=-1)
        means = [
            aux_scores[aux_labels == c].mean() if (aux_labels == c).any() else aux_scores.mean()
            for c in (0, 1)
        ]
        sign = 1.0 if means[1] >= means[0] else -1.0
        threshold = (means[0] + means[1]) / 2
        return ((scores - threshold) * sign > 0).long(), scores * sign

    if method == "cluster":
        points = torch.cat([feats, aux])
        assign, centroids = kmeans(points, num_classes, seed=seed)
        mapping = match_clusters(assign[len(feats) :], aux_labels, num_classes)
        # Per-label score: cosine similarity to the centroid mapped to that label.
        sims = F.normalize(feats, dim=-1) @ centroids.T  # [N, k clusters]
        scores = torch.empty_like(sims)
        scores[:, mapping] = sims
        pred = mapping[assign[: len(feats)]]
    else:  # classifier
        model = _fit_softmax(F.normalize(aux, dim=-1), aux_labels, num_classes, seed=seed)
        with torch.no_grad():
            scores = torch.softmax(model(F.normalize(feats, dim=-1)), dim=-1)
        pred = scores.argmax(-1)
    if num_classes == 2:
        scores = scores[:, 1] - scores[:, 0]
    return pred, scores


def evaluate_label_attack(
    *,
    spec: str,
    head_layers: int,
    tail_layers: int,
    defense_spec: str | None,
    grad_defense_spec: str | None,
    task: str,
    n: int,
    seed: int,
    method: str = "auto",
    known_labels: int = 8,
    binary: bool = False,
    batch_size: int = 8,
    max_length: int = 128,
    progress: bool = True,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
):
    """Label inference end to end: the client's training gradients for ``n`` test examples -> guesses.

    The attacker also knows the labels of ``known_labels`` examples per class (from the
    train split, never the attacked ones) — the few-known-labels setting of the label
    inference literature — and uses them to orient/threshold scores or name clusters.
    With ``binary`` only the first and the last label are kept (negative vs positive for
    ``sentiment``), so the binary ``norm`` attack applies. The victim's model computes on
    ``device`` in ``dtype``; the attacker's analysis of the gradients runs on the CPU.
    Returns an :class:`~fedsplit.attacks.result.AttackResult` with ``label_accuracy`` and ``auc``.
    """
    import dataclasses
    import time

    from ..model.device import resolve_device, resolve_dtype
    from ..model.loading import load_model
    from ..model.split import split
    from ..privacy import parse_defense, parse_grad_defense
    from ..tasks import collate, encode_example, load_task, pad_id_of
    from .metrics import accuracy, auc

    start = time.perf_counter()
    data = load_task(task, max_examples=max((8 if binary else 4) * n, 64), seed=seed)
    if data.kind != "classification":
        raise ValueError(f"the label attack needs a classification task; {task!r} is {data.kind}")
    num_classes = len(data.label_words)
    train, test = data.train, data.test
    if binary:
        last = num_classes - 1
        keep = {0: 0, last: 1}
        train, test = (
            [dataclasses.replace(e, label=keep[e.label]) for e in split_ if e.label in keep]
            for split_ in (train, test)
        )
        num_classes = 2
    device = resolve_device(device)
    model, tokenizer = load_model(spec, dtype=resolve_dtype(dtype, device))
    model.to(device)
    parts = split(model, head_layers, tail_layers)
    victims = test[:n]
    known = [ex for c in range(num_classes) for ex in [e for e in train if e.label == c][:known_labels]]

    torch.manual_seed(seed)
    defense = parse_defense(defense_spec, hidden_size=model.config.hidden_size)
    if defense is not None:
        defense.to(device)
    grad_defense = parse_grad_defense(grad_defense_spec)

    def grads_of(examples):
        batch = collate([encode_example(tokenizer, ex, max_length) for ex in examples], pad_id_of(tokenizer))
        return victim_gradients(
            parts.head,
            parts.body,
            parts.tail,
            batch["input_ids"],
            batch["labels"],
            batch["pad_lengths"],
            defense=defense,
            grad_defense=grad_defense,
            batch_size=batch_size,
            progress=progress,
        )

    # Features are taken per example, so rows of different widths never need to line up.
    victim_feats = gradient_features(grads_of(victims))
    known_feats = gradient_features(grads_of(known))
    labels = torch.tensor([ex.label for ex in victims])
    known_y = torch.tensor([ex.label for ex in known])
    pred, scores = infer_labels(victim_feats, num_classes, known_feats, known_y, method=method, seed=seed)
    names = [d.name for d in (defense, grad_defense) if d is not None]
    result = AttackResult(
        attack="label",
        defense="+".join(names) or "none",
        head_layers=head_layers,
        n=len(victims),
        seconds=round(time.perf_counter() - start, 2),
        label_accuracy=accuracy(pred, labels),
        auc=auc(scores, labels),
        model=spec,
        task=task,
    )
    log.info("label vs %s: accuracy %.3f, AUC %.3f", result.defense, result.label_accuracy, result.auc)
    return result
