"""Known-plaintext adaptation: what an attacker does with K (victim text, sent states) pairs.

Two ways to use the pairs, both cheap:

* :func:`finetune_on_pairs` fine-tunes a trained probe or inverter on the pairs' sent
  states (small lr, vocabulary grown by the pairs' tokens, early-stopped on a held-out
  quarter of the pairs);
* :func:`fit_state_map` fits a ridge map from the sent states to a reference head's clean
  outputs on the same texts (the attacker knows the texts, so it can run its head on them,
  token by token); the attacks made for that head then read the mapped states.

:func:`split_known` cuts a victim set into the K known pairs and the rows to evaluate,
which never share a text.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .inversion import embedding_matrix, frozen, real_mask
from .probe import class_lookup

DEFAULT_KNOWN_PAIRS = 32
# Ridge strengths, in units of the mean eigenvalue of the sent states' covariance.
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


@dataclass
class KnownPairs:
    """K victim texts (``ids [K, T]``, left-pad lengths ``pad [K]``) and the states sent for them."""

    ids: torch.Tensor
    pad: torch.Tensor
    hidden: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, index: torch.Tensor) -> KnownPairs:
        """The pairs at ``index``."""
        return KnownPairs(self.ids[index], self.pad[index], self.hidden[index])

    def to(self, device: torch.device | str) -> KnownPairs:
        """The pairs on ``device``."""
        return KnownPairs(self.ids.to(device), self.pad.to(device), self.hidden.to(device))

    def split(self, holdout: float, seed: int) -> tuple[KnownPairs, KnownPairs]:
        """``(fit, held_out)`` pairs; see :func:`holdout_rows`."""
        fit, held = holdout_rows(len(self), holdout, seed)
        return self.rows(fit), self.rows(held)


def holdout_rows(n: int, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded ``(fit, held_out)`` row indices: a ``holdout`` fraction held out, at least one row each."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_held = min(max(1, round(holdout * n)), n - 1)
    return order[n_held:], order[:n_held]


def split_known(
    ids: torch.Tensor, pad: torch.Tensor, hidden: torch.Tensor, k: int = DEFAULT_KNOWN_PAIRS, seed: int = 0
) -> tuple[KnownPairs, torch.Tensor]:
    """Split the victim rows into ``k`` known pairs and the rows to evaluate.

    Rows whose text equals a known text are dropped from the evaluated ones too, so no
    scored text is ever known. Returns ``(known pairs, evaluated row indices)``.
    """
    if not 0 < k < len(ids):
        raise ValueError(f"need 0 < k < number of victim texts, got k={k} for {len(ids)} texts")
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    known, rest = order[:k], order[k:]
    known_texts = {_text(ids, pad, i) for i in known.tolist()}
    evaluated = torch.tensor([i for i in rest.tolist() if _text(ids, pad, i) not in known_texts])
    evaluated = evaluated.to(torch.long).sort().values
    assert not set(known.tolist()) & set(evaluated.tolist())
    assert not known_texts & {_text(ids, pad, i) for i in evaluated.tolist()}
    return KnownPairs(ids[known], pad[known], hidden[known]), evaluated


def _text(ids: torch.Tensor, pad: torch.Tensor, row: int) -> tuple[int, ...]:
    return tuple(ids[row, int(pad[row]) :].tolist())


@dataclass
class StateMap:
    """An affine map of observed states onto a reference head's clean outputs (fp64 inside)."""

    weight: torch.Tensor
    source_mean: torch.Tensor
    target_mean: torch.Tensor

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        mapped = (hidden.to(self.weight) - self.source_mean) @ self.weight + self.target_mean
        return mapped.to(hidden.dtype)


def _solve_map(x: torch.Tensor, z: torch.Tensor, strength: float, prior: str) -> StateMap:
    """Ridge regression of ``z`` on ``x``, shrunk towards the identity or towards zero."""
    mx, mz = x.mean(0), z.mean(0)
    xc, zc = x - mx, z - mz
    gram = xc.T @ xc
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    lam = strength * float(gram.diagonal().mean().clamp_min(1e-12))
    target = xc.T @ zc + (lam * eye if prior == "identity" else 0.0)
    return StateMap(torch.linalg.solve(gram + lam * eye, target), mx, mz)


def fit_state_map(
    pairs: KnownPairs, reference_head: nn.Module, *, holdout: float = 0.25, seed: int = 0
) -> StateMap:
    """Least-squares map from the states the victim sent to ``reference_head``'s clean outputs.

    The attacker knows the K texts, so it runs its reference head (the public one, or the
    client's at the oracle tier) on them and pairs the outputs token by token with the
    observed states. The ridge strength and its prior (shrink towards the identity: the
    client's head is a fine-tune of the public one; or towards zero) are chosen by the mean
    cosine on a held-out ``holdout`` fraction of the pairs, then the map is refitted on all.
    """
    pairs = pairs.to(embedding_matrix(reference_head).device)
    with frozen(reference_head), torch.no_grad():
        clean = reference_head(pairs.ids, pairs.pad)
    real = real_mask(pairs.pad, pairs.ids.shape[1])
    fit, held = holdout_rows(len(pairs), holdout, seed)

    def tokens(states: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return (states[real] if rows is None else states[rows][real[rows]]).double()

    x_fit, z_fit = tokens(pairs.hidden, fit), tokens(clean, fit)
    x_held, z_held = tokens(pairs.hidden, held), tokens(clean, held)
    candidates = [(s, prior) for prior in ("identity", "zero") for s in RIDGE_GRID]
    fits = [
        F.cosine_similarity(_solve_map(x_fit, z_fit, s, prior)(x_held), z_held, dim=-1).mean()
        for s, prior in candidates
    ]
    strength, prior = candidates[int(torch.stack(fits).argmax())]
    return _solve_map(tokens(pairs.hidden), tokens(clean), strength, prior)


def _grow_vocabulary(model: nn.Module, extra: torch.Tensor, table: torch.Tensor) -> None:
    """Add output classes for ``extra`` token ids (a probe's or an inverter's ``out`` layer)."""
    if getattr(model, "kind", None) == "tied":  # its rows are the embedding table's: nothing to add
        model.grow(extra)
        return
    new = extra[~torch.isin(extra, model.vocab_ids.cpu())].to(model.vocab_ids.device)
    if len(new) == 0:
        return
    old = model.out
    out = nn.Linear(old.in_features, old.out_features + len(new)).to(old.weight.device)
    with torch.no_grad():
        out.weight[: old.out_features] = old.weight
        out.bias[: old.out_features] = old.bias
        norm = old.weight.norm(dim=-1).mean()
        if old.in_features == table.shape[1]:
            # The residual stream still points at the token's embedding: start from its row.
            out.weight[old.out_features :] = F.normalize(table[new].float(), dim=-1).to(out.weight) * norm
        else:
            out.weight[old.out_features :] = old.weight.mean(0)
        out.bias[old.out_features :] = old.bias.mean()
    model.out = out
    model.vocab_ids = torch.cat([model.vocab_ids, new])


def finetune_on_pairs(
    model: nn.Module,
    pairs: KnownPairs,
    table: torch.Tensor,
    *,
    steps: int,
    lr: float,
    holdout: float = 0.25,
    seed: int = 0,
    ignore_ids: Iterable[int] = (),
) -> nn.Module:
    """A copy of a trained probe / inverter fine-tuned on the known pairs' sent states.

    Its vocabulary grows by the tokens of the fitted pairs; AdamW at ``lr`` on all the
    fitted pairs per step; the state with the best token accuracy on the held-out pairs
    wins (the unadapted model included), and training stops after ``steps // 4`` steps
    without improvement.
    """
    device = model.vocab_ids.device
    fit, held = pairs.split(holdout, seed)
    model = copy.deepcopy(model)
    extra = torch.unique(fit.ids[real_mask(fit.pad, fit.ids.shape[1])].cpu())
    ignore = torch.tensor(sorted({int(i) for i in ignore_ids}), dtype=torch.long)
    _grow_vocabulary(model, extra[~torch.isin(extra, ignore)], table)
    lookup = class_lookup(model.vocab_ids, table.shape[0])

    def batch(part: KnownPairs):
        ids, pad = part.ids.to(device), part.pad.to(device)
        return part.hidden.to(device).float(), pad, lookup[ids], real_mask(pad, ids.shape[1])

    (x_fit, pad_fit, y_fit, m_fit), (x_held, pad_held, y_held, m_held) = batch(fit), batch(held)

    def held_accuracy() -> float:
        model.eval()
        with torch.no_grad():
            pred = model(x_held, pad_held).argmax(-1)
        return float((pred == y_held)[m_held].float().mean())

    best, best_state, since = held_accuracy(), copy.deepcopy(model.state_dict()), 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for _ in range(steps):
            model.train()
            loss = F.cross_entropy(model(x_fit, pad_fit)[m_fit], y_fit[m_fit], ignore_index=-100)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            accuracy = held_accuracy()
            if accuracy > best:
                best, best_state, since = accuracy, copy.deepcopy(model.state_dict()), 0
            elif (since := since + 1) >= max(1, steps // 4):
                break
    model.load_state_dict(best_state)
    return model.eval()


__all__ = [
    "DEFAULT_KNOWN_PAIRS",
    "RIDGE_GRID",
    "KnownPairs",
    "StateMap",
    "finetune_on_pairs",
    "fit_state_map",
    "holdout_rows",
    "split_known",
]
