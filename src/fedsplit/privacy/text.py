"""Text-level d_chi-privacy: every input token is replaced by a random neighbour in embedding space.

SanText (Yue et al., "Differential Privacy for Text Analytics via Natural Text
Sanitization", Findings of ACL 2021) and CusText (Chen et al., "A Customized Text
Sanitization Mechanism with Differential Privacy", Findings of ACL 2023), in our own
implementation, on the token embeddings of the model itself. Before the head runs, each
token ``x`` becomes ``y`` with probability

    P(y | x) = exp(-eps/2 * d(x, y)) / sum_{y' in C(x)} exp(-eps/2 * d(x, y')),

``d`` the Euclidean distance between rows of the input embedding matrix (as stored, before
any model-specific scaling), ``C(x)`` the candidate set: the whole vocabulary (SanText,
``k=0``) or the ``k`` nearest tokens to ``x``, ``x`` included (CusText-style, ``k=K``).
Protected ids (special tokens) are never replaced nor chosen, and pad positions are kept.

Guarantee (whole vocabulary): for any tokens ``x, x'`` and any output ``y``,
``P(y|x) <= exp(eps * d(x, x')) * P(y|x')`` (both the numerator and the normaliser move by
at most ``exp(eps/2 * d(x, x'))``, by the triangle inequality): ``eps * d``-privacy (metric
DP, d_chi-privacy) per token. Tokens are perturbed independently, so a sequence is
``eps * sum_t d(x_t, x'_t)``-private. Everything the server sees (hidden states,
gradients) is computed from the perturbed ids, so it inherits the guarantee as
post-processing, for the input text; it says nothing about the labels of training.
``eps`` is per unit of embedding distance: it means something only next to the
distances of the model's embedding table (``nearest_distance_quantiles``).

With ``k`` candidates the guarantee only holds between tokens with the *same* candidate
set. Otherwise some output ``y`` is possible from ``x`` and impossible from ``x'``
(probability ratio unbounded): seeing ``y`` rules out every token that does not have ``y``
among its ``k`` nearest. What is left is "``x`` is one of the tokens near ``y``", graded by
``exp(-eps/2 * d)`` within it. CusText restores a per-set guarantee by partitioning the
vocabulary into sets of ``k`` that share one candidate set; this module does not.

Randomness: a private generator seeded with ``seed`` (reproducible), or torch's global
generator when ``seed`` is ``None``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from fedsplit.privacy.base import TokenDefense, check_finite_positive, format_number, real_token_mask

logger = logging.getLogger(__name__)

# Distances are computed for this many (rows x vocabulary) entries at a time.
_BLOCK_ENTRIES = 1 << 22


class TextDX(TokenDefense):
    """SanText/CusText d_chi-private token replacement before the head.

    Args:
        embedding_weight: the input embedding matrix ``[V, E]`` (kept by reference, without grad).
        epsilon: privacy per unit of embedding distance; larger keeps more tokens.
        k: candidates per token (the ``k`` nearest, itself included); 0 means the whole vocabulary.
        seed: seed of a private generator, or ``None`` for torch's global generator.
        keep_ids: ids never replaced and never chosen (special tokens: BOS, EOS, pad...).

    Cost: a whole-vocabulary draw computes, at every call, the distances from each distinct
    token of the batch to the whole vocabulary (``n_distinct x V x E`` multiply-adds, in
    blocks of bounded memory): milliseconds on a GPU, but tens of seconds for a 4k-token
    batch of a 49k-token vocabulary on two CPU cores. With ``k`` each token's candidates
    are computed once and cached.
    """

    kind = "textdx"

    def __init__(
        self,
        embedding_weight: torch.Tensor,
        epsilon: float,
        k: int = 0,
        seed: int | None = None,
        keep_ids: Iterable[int] = (),
    ) -> None:
        super().__init__()
        if embedding_weight.dim() != 2 or embedding_weight.shape[0] < 2:
            raise ValueError(
                f"textdx needs an embedding matrix [V >= 2, E], got {tuple(embedding_weight.shape)}"
            )
        # A plain attribute (not a parameter or buffer): never trained, never saved, never copied.
        self.embedding = embedding_weight.detach()
        self.vocab_size = int(embedding_weight.shape[0])
        self.epsilon = check_finite_positive("textdx epsilon", epsilon)
        if int(k) < 0 or int(k) == 1:
            raise ValueError(f"textdx k must be 0 (whole vocabulary) or >= 2, got {k}")
        self.k = min(int(k), self.vocab_size)
        self.seed = None if seed is None else int(seed)
        device = self.embedding.device
        self.keep_ids = torch.tensor(sorted({int(i) for i in keep_ids}), dtype=torch.long, device=device)
        self._generator = None
        if self.seed is not None:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        # k nearest candidates per token, filled lazily for the tokens seen (-1: not yet).
        self._candidates: torch.Tensor | None = None
        self._candidate_distances: torch.Tensor | None = None

    @property
    def name(self) -> str:
        extra = (f",k={self.k}" if self.k else "") + (f",seed={self.seed}" if self.seed is not None else "")
        return f"textdx:{format_number(self.epsilon)}{extra}"

    @property
    def epsilon_per_token(self) -> float:
        """``eps``: each token release is ``eps * d(x, x')``-private (whole vocabulary; see the module doc)."""
        return self.epsilon

    def metric_epsilon(self, steps: int = 1) -> float:
        """Epsilon per unit embedding distance after ``steps`` releases of the same token (basic composition)."""
        return self.epsilon * steps

    def perturb(
        self, input_ids: torch.Tensor, pad_lengths: torch.Tensor | None = None, offset: int = 0
    ) -> torch.Tensor:
        """New ids ``[B, T]``: each real, unprotected token replaced by a draw from ``P(. | x)``."""
        out = input_ids.clone()
        change = real_token_mask(input_ids, pad_lengths, offset)
        if self.keep_ids.numel():
            change &= ~torch.isin(input_ids, self.keep_ids.to(input_ids.device))
        if not bool(change.any()):
            return out
        tokens = input_ids[change].to(self.embedding.device)
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size:
            raise ValueError(f"textdx got token ids outside [0, {self.vocab_size})")
        unique, inverse = tokens.unique(return_inverse=True)
        draw = self._draw_knn if self.k else self._draw_full
        out[change] = draw(unique, inverse).to(out.device, out.dtype)
        return out

    # ------------------------------------------------------------------ sampling

    def _distances(self, rows: torch.Tensor) -> torch.Tensor:
        """``[len(rows), V]`` float32 distances; protected ids at +inf; the row's own token at exactly 0."""
        weight = self.embedding
        dist = torch.cdist(weight[rows].float(), weight.float())
        dist[torch.arange(rows.numel(), device=dist.device), rows] = 0.0  # cdist's Gram form rounds it
        if self.keep_ids.numel():
            dist[:, self.keep_ids] = float("inf")
        return dist

    def _row_blocks(self, n: int) -> Iterable[slice]:
        step = max(1, _BLOCK_ENTRIES // self.vocab_size)
        return (slice(i, min(i + step, n)) for i in range(0, n, step))

    def _draw_full(self, unique: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        """One draw per position over the whole vocabulary, a block of distinct tokens at a time.

        Inverse-CDF sampling on the rows' CDFs laid end to end (row ``r`` shifted by ``r``):
        one ``searchsorted`` serves every position of the block, and nothing of size
        positions x vocabulary is ever built.
        """
        result = torch.empty_like(inverse)
        u = torch.rand(inverse.numel(), generator=self._generator, device=inverse.device, dtype=torch.float64)
        for block in self._row_blocks(unique.numel()):
            logits = -0.5 * self.epsilon * self._distances(unique[block]).double()
            cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)
            # Ends at exactly 1.0, and a zero-mass token (a protected id) keeps a zero-width step.
            cdf = cdf / cdf[:, -1:]
            rows = torch.arange(cdf.shape[0], device=cdf.device, dtype=torch.float64)
            flat = (cdf + rows.unsqueeze(1)).reshape(-1)
            here = (inverse >= block.start) & (inverse < block.stop)
            row = inverse[here] - block.start
            index = torch.searchsorted(flat, row.double() + u[here], right=True)
            result[here] = (index - row * self.vocab_size).clamp(0, self.vocab_size - 1)
        return result

    def _neighbours(self, unique: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest candidates of each token ``[n, k]`` and their distances, cached per token."""
        if self._candidates is None:
            device = self.embedding.device
            self._candidates = torch.full((self.vocab_size, self.k), -1, dtype=torch.long, device=device)
            self._candidate_distances = torch.zeros(self.vocab_size, self.k, device=device)
        missing = unique[self._candidates[unique, 0] < 0]
        for block in self._row_blocks(missing.numel()):
            rows = missing[block]
            found = self._distances(rows).topk(self.k, dim=-1, largest=False)
            self._candidates[rows], self._candidate_distances[rows] = found.indices, found.values
        return self._candidates[unique], self._candidate_distances[unique]

    def _draw_knn(self, unique: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        candidates, distances = self._neighbours(unique)
        # Protected ids reach the top k only when fewer than k others exist; inf keeps them out.
        probs = torch.softmax(-0.5 * self.epsilon * distances.double(), dim=-1)
        choice = torch.multinomial(probs[inverse], 1, generator=self._generator).squeeze(1)
        return candidates[inverse, choice]

    def nearest_distance_quantiles(
        self, quantiles: Iterable[float] = (0.1, 0.5, 0.9), sample: int = 1024
    ) -> list[float]:
        """Quantiles of the distance from a token to its nearest other token (on up to ``sample`` tokens).

        A scale for ``epsilon``: a neighbour at distance ``d`` is ``exp(-eps/2 * d)`` as likely as the token.
        """
        generator = torch.Generator(device="cpu").manual_seed(0)
        rows = torch.randperm(self.vocab_size, generator=generator)[:sample].to(self.embedding.device)
        nearest = []
        for block in self._row_blocks(rows.numel()):
            dist = self._distances(rows[block])
            dist[torch.arange(dist.shape[0], device=dist.device), rows[block]] = float("inf")
            nearest.append(dist.min(dim=-1).values)
        values = torch.cat(nearest)
        values = values[torch.isfinite(values)]
        q = torch.tensor(list(quantiles), dtype=values.dtype, device=values.device)
        return [float(v) for v in torch.quantile(values, q)]
