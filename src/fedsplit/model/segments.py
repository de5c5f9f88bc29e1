"""Head, body and tail: spans of a causal LM's decoder that run Hugging Face's own layers.

A segment never takes or returns a 4-D attention mask. It rebuilds the mask from a
compact description — per-row left-padding lengths plus the number of tokens already
in its KV cache — and computes rotary embeddings locally from position ids. Layers are
kept in a ``ModuleDict`` keyed by their global index, so parameter names
(``layers.7.self_attn.q_proj...``) are the same in every segment and in the unsplit model.
What a family's model class does between its layers (embedding scale, sliding-window layers,
per-kind rotary, logit scaling) comes from its :class:`~fedsplit.model.families.Family`.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from .families import SLIDING, family_of
from .kv_cache import KVCache


@functools.cache
def cache_argument(layer_class: type) -> str:
    """The name under which ``layer_class.forward`` takes the KV cache.

    transformers renamed it ``past_key_value`` -> ``past_key_values`` -> ``cache`` (5.3x, with a
    deprecation warning for the old name until 5.40); passing the name the installed version
    declares keeps the layers unchanged and silent across versions.
    """
    parameters = inspect.signature(layer_class.forward).parameters
    for name in ("cache", "past_key_values", "past_key_value"):
        if name in parameters:
            return name
    return "past_key_values"


def positions_and_mask(
    pad_lengths: torch.Tensor,
    q_len: int,
    offset: int,
    dtype: torch.dtype,
    device=None,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids [B, q_len] and an additive attention mask [B, 1, q_len, offset + q_len].

    Row ``b`` has ``pad_lengths[b]`` pad tokens at its start (inside the cache when
    ``offset > 0``). A real query at absolute index ``i`` attends to keys ``k`` with
    ``pad <= k <= i``, and ``i - k < sliding_window`` when one is given (Hugging Face's
    convention); a pad query attends only to itself, which keeps its (unused)
    output finite so no NaN reaches the backward pass.
    """
    device = device if device is not None else pad_lengths.device
    pad = pad_lengths.to(device=device, dtype=torch.long).view(-1, 1, 1)
    q_abs = torch.arange(offset, offset + q_len, device=device).view(1, -1, 1)
    k_abs = torch.arange(offset + q_len, device=device).view(1, 1, -1)
    real_query = q_abs >= pad
    allowed = (k_abs <= q_abs) & (k_abs >= pad) & real_query
    if sliding_window is not None:
        allowed = allowed & (q_abs - k_abs < sliding_window)
    allowed = allowed | (~real_query & (k_abs == q_abs))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )
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
        self.family = family_of(config)
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
            pad_lengths = torch.zeros(batch, dtype=torch.long, device=hidden.device)
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
            kinds = self.family.layer_kinds(self.config)
            window = getattr(self.config, "sliding_window", None)
            masks, rotary = {}, {}
            for kind in {kinds[i] for i in indices}:
                positions, masks[kind] = positions_and_mask(
                    pad_lengths,
                    q_len,
                    offset,
                    hidden.dtype,
                    hidden.device,
                    window if kind == SLIDING else None,
                )
                if self.family.rotary_per_kind:
                    rotary[kind] = self.rotary_emb(hidden, positions, kind)
            if not self.family.rotary_per_kind:
                rotary = dict.fromkeys(masks, self.rotary_emb(hidden, positions))
            for i in indices:
                layer = self.layers[str(i)]
                out = layer(
                    hidden,
                    attention_mask=masks[kinds[i]],
                    position_ids=positions,
                    use_cache=cache is not None,
                    position_embeddings=rotary[kinds[i]],
                    **{cache_argument(type(layer)): cache},
                )
                # MoE layers of some versions return a tuple whose first item is the hidden state.
                hidden = out[0] if isinstance(out, tuple) else out
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
        hidden = self.family.scale_embeddings(hidden, self.config, self.training)
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
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, V]; with a boolean ``select`` [B, T], only those positions' logits [n, V];
        with ``last_only``, the last position's [B, 1, V].

        The LM head is the largest matrix of a small model; training needs logits only where
        there is a label, so ``select`` skips the rest, and generation needs only the last
        position's (``last_only``: a prefill does not pay the LM head for every prompt token).
        """
        hidden = self.norm(self.run_layers(hidden, pad_lengths, cache, offset))
        if select is not None:
            hidden = hidden[select]
        elif last_only:
            hidden = hidden[:, -1:]
        return self.family.finish_logits(self.lm_head(hidden), self.config)
