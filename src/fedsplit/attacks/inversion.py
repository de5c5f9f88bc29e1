"""Optimisation attacks that recover tokens from the hidden states the server receives.

The server sees ``hidden = defence(head(tokens))`` ``[B, T, H]`` and knows the public
weights, so it can run its own copy of the public head (without the client's
private LoRA) and search for inputs whose output matches what it saw:

* :func:`invert_nearest` (p = 0): the hidden states *are* the token embeddings
  (plus any defence), so each vector is matched to the closest embedding row.
* :func:`invert_vmi` (white-box model inversion): optimise continuous input
  embeddings ``[T, H]`` through the head with Adam, then map each one to its nearest
  embedding row.
* :func:`invert_relaxation` (Song & Raghunathan, "Information Leakage in Embedding
  Models", CCS 2020): optimise per-position logits over the vocabulary; the input is
  the softmax-weighted mix of embedding rows, the tokens are the argmax.

All functions take the head in any mode, leave its parameters untouched and
return token ids ``[B, T]`` (pad positions hold whatever the search found there;
scoring ignores them).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

DEFAULT_VMI_STEPS = 100
DEFAULT_RELAX_STEPS = 100
# Above this vocabulary size the relaxation searches a per-position candidate list, not the whole vocabulary.
RELAX_FULL_VOCAB_MAX = 4096


def real_mask(pad_lengths: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, T]`` bool, True at real (non-pad) positions of left-padded rows."""
    columns = torch.arange(length, device=pad_lengths.device)
    return columns.view(1, -1) >= pad_lengths.to(torch.long).view(-1, 1)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients inside the block; both restored afterwards."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    was_training = module.training
    for p, _ in flags:
        p.requires_grad_(False)
    module.eval()
    try:
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(was_training)


def embedding_matrix(head: nn.Module, vocab_size: int | None = None) -> torch.Tensor:
    """The public embedding table ``[V, H]`` (detached), cut to the tokenizer's ``vocab_size`` if given.

    Rows past the tokenizer's length (padding of the vocabulary) are never produced by
    a real client, so the attacker leaves them out of the search.
    """
    weight = head.embed_tokens.weight.detach()
    return weight[:vocab_size] if vocab_size is not None else weight


def nearest_tokens(
    vectors: torch.Tensor, embedding: torch.Tensor, metric: str = "l2", chunk: int = 2048
) -> torch.Tensor:
    """Index of the nearest embedding row for each vector ``[..., H]`` -> ``[...]``.

    ``metric`` is ``"l2"`` (Euclidean; the maximum-likelihood match under isotropic
    Gaussian noise) or ``"cosine"``. Vectors are processed in chunks so a
    ``[N, V]`` distance matrix never has to fit in memory at once.
    """
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    flat = vectors.detach().reshape(-1, vectors.shape[-1]).to(embedding.dtype)
    table = F.normalize(embedding, dim=-1) if metric == "cosine" else embedding
    sq_norms = embedding.pow(2).sum(-1)
    out = []
    for start in range(0, flat.shape[0], chunk):
        part = flat[start : start + chunk]
        if metric == "cosine":
            scores = F.normalize(part, dim=-1) @ table.T
        else:  # argmin ||x - e||^2 = argmax 2 x.e - ||e||^2
            scores = 2 * part @ table.T - sq_norms
        out.append(scores.argmax(-1))
    return (
        torch.cat(out).reshape(vectors.shape[:-1])
        if out
        else torch.zeros(vectors.shape[:-1], dtype=torch.long, device=vectors.device)
    )


def topk_tokens(vectors: torch.Tensor, embedding: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """The ``k`` embedding rows most cosine-similar to each vector: ``[..., k]`` ids."""
    flat = vectors.detach().reshape(-1, vectors.shape[-1]).to(embedding.dtype)
    table = F.normalize(embedding, dim=-1)
    out = [
        (F.normalize(flat[s : s + chunk], dim=-1) @ table.T).topk(k, dim=-1).indices
        for s in range(0, flat.shape[0], chunk)
    ]
    return torch.cat(out).reshape(*vectors.shape[:-1], k)


def invert_nearest(
    head: nn.Module,
    hidden: torch.Tensor,
    pad_lengths: torch.Tensor | None = None,
    *,
    metric: str = "l2",
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Nearest-embedding attack for a head with no decoder blocks (p = 0).

    With p > 0 it still runs (matching the hidden states as if they were embeddings)
    but is not expected to work: use :func:`invert_vmi` there.
    """
    if len(getattr(head, "layers", ())) > 0:
        log.warning("nearest-neighbour inversion assumes p = 0 but the head has %d blocks", len(head.layers))
    return nearest_tokens(hidden, embedding_matrix(head, vocab_size), metric)


def _match_loss(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean per-token mismatch over real positions; the sum over rows keeps rows independent."""
    if loss == "cosine":
        per_token = 1 - F.cosine_similarity(out, target, dim=-1)
    elif loss == "mse":
        # Normalised by the target's energy so high-norm tokens (attention sinks) do not dominate.
        per_token = (out - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-6)
    else:
        raise ValueError(f"loss must be 'cosine' or 'mse', got {loss!r}")
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


def buckets(pad_lengths: torch.Tensor, size: int | None) -> list[tuple[torch.Tensor, int]]:
    """Groups of rows of similar length: ``(row indices, leading columns that are pad in all of them)``.

    Rows are sorted by length and cut into groups of ``size``; dropping the columns that
    are padding in every row of a group is exact (positions and masks are rebuilt from
    the reduced pad lengths) and saves the compute a short row would waste.
    """
    order = torch.argsort(pad_lengths, descending=True, stable=True)
    size = size or len(order)
    groups = []
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        groups.append((rows, int(pad_lengths[rows].min()) if len(rows) else 0))
    return groups


def invert_vmi(
    head: nn.Module,
    hidden: torch.Tensor,
    pad_lengths: torch.Tensor | None = None,
    *,
    steps: int = DEFAULT_VMI_STEPS,
    lr: float = 2.0,
    loss: str = "cosine",
    metric: str = "l2",
    init: torch.Tensor | None = None,
    vocab_size: int | None = None,
    batch_size: int | None = 64,
    seed: int = 0,
    progress: bool = True,
    return_embeds: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """White-box model inversion: fit input embeddings so the public head reproduces ``hidden``.

    Args:
        head: the attacker's copy of the public head (``Head``: ``embed_tokens`` + layers).
        hidden: observed hidden states ``[B, T, H]`` (after any defence).
        pad_lengths: left-pad lengths ``[B]``; pad positions are left out of the loss.
        steps: Adam steps per batch chunk.
        lr: Adam learning rate, in units of the embedding table's standard deviation
            (so one value works for models whose embeddings differ in scale).
        loss: ``"cosine"`` (per-token 1 - cos) or ``"mse"`` (squared error relative to each
            target token's energy).
        metric: how the final embeddings are mapped to tokens, ``"cosine"`` or ``"l2"``.
        init: starting embeddings ``[B, T, H]`` (e.g. from a learned inverter); default: the
            mean embedding row plus small noise.
        vocab_size: search only the first ``vocab_size`` rows (the tokenizer's length).
        batch_size: rows optimised together (bounds memory; rows do not interact).
        seed: seeds the random start.
        progress: show a tqdm bar.
        return_embeds: also return the optimised embeddings.

    Returns:
        Token ids ``[B, T]``, and the embeddings ``[B, T, H]`` if ``return_embeds``.
    """
    batch, length, _ = hidden.shape
    if pad_lengths is None:
        pad_lengths = torch.zeros(batch, dtype=torch.long, device=hidden.device)
    table = embedding_matrix(head, vocab_size)
    scale = float(table.std())
    generator = torch.Generator().manual_seed(seed)
    if init is None:
        start = table.mean(0).expand(batch, length, -1).clone()
        # drawn from the seeded CPU generator whatever the device: the same start everywhere
        noise = torch.randn(start.shape, generator=generator, dtype=start.dtype)
        start += 0.1 * scale * noise.to(start.device)
    else:
        start = init.detach().clone().to(table.dtype)
    mask = real_mask(pad_lengths, length).to(hidden.dtype)
    target = hidden.detach()
    result = start.clone()
    groups = buckets(pad_lengths, batch_size)
    bar = tqdm(total=steps * len(groups), desc="vmi", disable=not progress, leave=False)
    with frozen(head):
        for rows, cut in groups:
            x = start[rows, cut:].clone().requires_grad_(True)
            rows_pad, rows_target, rows_mask = pad_lengths[rows] - cut, target[rows, cut:], mask[rows, cut:]
            optimizer = torch.optim.Adam([x], lr=lr * scale)
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                out = head(inputs_embeds=x, pad_lengths=rows_pad)
                value = _match_loss(out, rows_target, rows_mask, loss)
                value.backward()
                optimizer.step()
                bar.update(1)
            bar.set_postfix(loss=f"{value.item():.4f}")
            result[rows, cut:] = x.detach()
    bar.close()
    ids = nearest_tokens(result, table, metric)
    return (ids, result) if return_embeds else ids


def invert_relaxation(
    head: nn.Module,
    hidden: torch.Tensor,
    pad_lengths: torch.Tensor | None = None,
    *,
    steps: int = DEFAULT_RELAX_STEPS,
    lr: float = 0.1,
    temperature: float = 0.05,
    loss: str = "cosine",
    candidates: int | None = None,
    init_ids: torch.Tensor | None = None,
    init_embeds: torch.Tensor | None = None,
    vocab_size: int | None = None,
    batch_size: int | None = 32,
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Continuous relaxation over the vocabulary (Song & Raghunathan, CCS 2020).

    Per position, logits ``z`` over the vocabulary are optimised so that
    ``head(softmax(z / temperature) @ E)`` matches ``hidden``; the tokens are ``argmax z``.

    For a large vocabulary (more than :data:`RELAX_FULL_VOCAB_MAX` rows, or when
    ``candidates`` is given) each position searches only its ``candidates`` nearest
    embedding rows to a starting point: ``init_embeds`` if given, else a short
    :func:`invert_vmi` run (a quarter of ``steps``). That keeps the
    ``[B, T, V]`` logits and the ``softmax @ E`` product affordable on a CPU.

    Args:
        init_ids: a starting guess ``[B, T]`` (e.g. a learned inverter's output); its
            tokens start with the largest logit and are always among the candidates.
        temperature: softmax temperature; small values push the mix towards one token.
        Other arguments as in :func:`invert_vmi`.

    Returns:
        Token ids ``[B, T]``.
    """
    batch, length, _ = hidden.shape
    if pad_lengths is None:
        pad_lengths = torch.zeros(batch, dtype=torch.long, device=hidden.device)
    table = embedding_matrix(head, vocab_size)
    vocab = table.shape[0]
    if candidates is None and vocab > RELAX_FULL_VOCAB_MAX:
        candidates = 256
    if candidates is not None and candidates < vocab:
        if init_embeds is None:
            start_steps = max(steps // 4, 1)
            init_embeds = invert_vmi(
                head,
                hidden,
                pad_lengths,
                steps=start_steps,
                vocab_size=vocab_size,
                seed=seed,
                progress=progress,
                return_embeds=True,
                init=None if init_ids is None else table[init_ids],
            )[1]
        cand = topk_tokens(init_embeds, table, candidates)  # [B, T, K]
        if init_ids is not None:
            cand[..., -1] = init_ids
    else:
        cand = None
    mask = real_mask(pad_lengths, length).to(hidden.dtype)
    target = hidden.detach()
    result = torch.zeros(batch, length, dtype=torch.long, device=hidden.device)
    groups = buckets(pad_lengths, batch_size)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=steps * len(groups), desc="relaxation", disable=not progress, leave=False)
    with frozen(head):
        for rows, cut in groups:
            rows_pad, rows_target, rows_mask = pad_lengths[rows] - cut, target[rows, cut:], mask[rows, cut:]
            rows_cand = cand[rows, cut:] if cand is not None else None
            width = rows_cand.shape[-1] if rows_cand is not None else vocab
            z = 0.01 * torch.randn(len(rows), length - cut, width, generator=generator, dtype=table.dtype)
            z = z.to(table.device)
            if init_ids is not None:
                guess = init_ids[rows, cut:]
                hit = (rows_cand == guess[..., None]) if rows_cand is not None else F.one_hot(guess, vocab)
                z = z + 2.0 * temperature * hit.to(z.dtype)
            z.requires_grad_(True)
            rows_table = table[rows_cand] if rows_cand is not None else None  # [b, T, K, H]
            optimizer = torch.optim.Adam([z], lr=lr)
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                weights = torch.softmax(z / temperature, dim=-1)
                if rows_table is not None:
                    x = torch.einsum("btk,btkh->bth", weights, rows_table)
                else:
                    x = weights @ table
                out = head(inputs_embeds=x, pad_lengths=rows_pad)
                value = _match_loss(out, rows_target, rows_mask, loss)
                value.backward()
                optimizer.step()
                bar.update(1)
            bar.set_postfix(loss=f"{value.item():.4f}")
            best = z.detach().argmax(-1)
            if rows_cand is not None:
                best = rows_cand.gather(-1, best[..., None]).squeeze(-1)
            result[rows, cut:] = best
    bar.close()
    return result
