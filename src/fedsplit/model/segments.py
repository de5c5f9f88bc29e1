"""Head, body and tail: spans of a causal LM's decoder that run Hugging Face's own layers.

A segment never takes or returns a 4-D attention mask. It rebuilds the mask from a
compact description — per-row left-padding lengths plus the number of tokens already
in its KV cache — and computes rotary embeddings locally from position ids. Layers are
kept in a ``ModuleDict`` keyed by their global index, so parameter names
(``layers.7.self_attn.q_proj...``) are the same in every segment and in the unsplit model.
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache:
    """Key/value cache for the layers of one segment, keyed by global layer index.

    Duck-types the ``update(key, value, layer_idx)`` call that Hugging Face attention
    modules make, so the decoder layers run unchanged. All rows share one length:
    sequences are left-padded, so the pad rule covers the cached prefix too.
    """

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.length = 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx in self.layers:
            old_k, old_v = self.layers[layer_idx]
            key = torch.cat([old_k, key], dim=-2)
            value = torch.cat([old_v, value], dim=-2)
        self.layers[layer_idx] = (key, value)
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.layers.values())

    def select_rows(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only the given batch rows (e.g. when some sequences finished)."""
        index = torch.as_tensor(rows, dtype=torch.long)
        self.layers = {i: (k[index], v[index]) for i, (k, v) in self.layers.items()}


def positions_and_mask(
    pad_lengths: torch.Tensor, q_len: int, offset: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids [B, q_len] and an additive attention mask [B, 1, q_len, offset + q_len].

    Row ``b`` has ``pad_lengths[b]`` pad tokens at its start (inside the cache when
    ``offset > 0``). A real query at absolute index ``i`` attends to keys ``k`` with
    ``pad <= k <= i``; a pad query attends only to itself, which keeps its (unused)
    output finite so no NaN reaches the backward pass.
    """
    pad = pad_lengths.to(torch.long).view(-1, 1, 1)
    q_abs = torch.arange(offset, offset + q_len).view(1, -1, 1)
    k_abs = torch.arange(offset + q_len).view(1, 1, -1)
    real_query = q_abs >= pad
    allowed = (k_abs <= q_abs) & (k_abs >= pad) & real_query
    allowed = allowed | (~real_query & (k_abs == q_abs))
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    positions = (q_abs.view(1, -1) - pad.view(-1, 1)).clamp(min=0)
    return positions, mask.unsqueeze(1)


class Segment(nn.Module):
    """A contiguous span of decoder layers ``[start, end)`` with its rotary embedding."""

    def __init__(
        self, layers: dict[int, nn.Module], rotary_emb: nn.Module, config, start: int | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleDict({str(i): layer for i, layer in sorted(layers.items())})
        self.rotary_emb = rotary_emb
        # Where an empty segment sits (e.g. a body of zero layers when p + q = N).
        self.start = start if start is not None else (min(layers) if layers else 0)

    @property
    def layer_indices(self) -> list[int]:
        return sorted(int(i) for i in self.layers.keys())

    @property
    def span(self) -> tuple[int, int]:
        idx = self.layer_indices
        return (idx[0], idx[-1] + 1) if idx else (self.start, self.start)

    def run_layers(
        self,
        hidden: torch.Tensor,
        pad_lengths: torch.Tensor | None = None,
        cache: KVCache | None = None,
        offset: int | None = None,
        span: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Run layers ``span`` (default: all held) over ``hidden`` [B, T, H].

        ``offset`` is the number of tokens already processed (default: the cache length).
        The cache length is advanced by T after the call.
        """
        batch, q_len = hidden.shape[:2]
        if pad_lengths is None:
            pad_lengths = torch.zeros(batch, dtype=torch.long)
        if offset is None:
            offset = cache.length if cache is not None else 0
        indices = self.layer_indices
        if span is not None:
            start, end = span
            missing = [i for i in range(start, end) if str(i) not in self.layers]
            if missing:
                raise ValueError(
                    f"span [{start}, {end}) is not inside the held layers {list(self.span)}: "
                    f"missing layers {missing}"
                )
            indices = list(range(start, end))
        if indices:
            positions, mask = positions_and_mask(pad_lengths, q_len, offset, hidden.dtype)
            position_embeddings = self.rotary_emb(hidden, positions)
            for i in indices:
                hidden = self.layers[str(i)](
                    hidden,
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=cache is not None,
                    position_embeddings=position_embeddings,
                )
        if cache is not None:
            cache.length = offset + q_len
        return hidden


class Head(Segment):
    """Embedding + decoder blocks ``[0, p)``: tokens in, hidden states out."""

    def __init__(self, embed_tokens: nn.Module, layers, rotary_emb, config) -> None:
        super().__init__(layers, rotary_emb, config)
        self.embed_tokens = embed_tokens

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pad_lengths: torch.Tensor | None = None,
        cache: KVCache | None = None,
        offset: int | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        return self.run_layers(hidden, pad_lengths, cache, offset)


class Body(Segment):
    """Decoder blocks ``[p, N-q)``, or any sub-span of the held layers per call."""

    def forward(
        self,
        hidden: torch.Tensor,
        pad_lengths: torch.Tensor | None = None,
        cache: KVCache | None = None,
        offset: int | None = None,
        span: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        return self.run_layers(hidden, pad_lengths, cache, offset, span)


class Tail(Segment):
    """Decoder blocks ``[N-q, N)`` + final norm + LM head: hidden states in, logits out."""

    def __init__(self, layers, norm: nn.Module, lm_head: nn.Module, rotary_emb, config) -> None:
        super().__init__(layers, rotary_emb, config)
        self.norm = norm
        self.lm_head = lm_head

    def forward(
        self,
        hidden: torch.Tensor,
        pad_lengths: torch.Tensor | None = None,
        cache: KVCache | None = None,
        offset: int | None = None,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V]; with a boolean ``select`` [B, T], only those positions' logits [n, V].

        The LM head is the largest matrix of a small model; training needs logits only where
        there is a label, so ``select`` skips the rest.
        """
        hidden = self.norm(self.run_layers(hidden, pad_lengths, cache, offset))
        if select is not None:
            hidden = hidden[select]
        return self.lm_head(hidden)
