"""What each model family does between its decoder layers, declared as small per-family hooks.

fedsplit never forks modeling code: a segment runs the family's own decoder-layer modules as
they are. The little a family's ``Model.forward`` / ``ForCausalLM.forward`` does outside those
layers — scale the embeddings, give each layer full or sliding-window attention, compute rotary
embeddings per attention kind, scale or soft-cap the logits, name the final norm — is declared
here, one :class:`Family` per ``config.model_type``, and applied by ``segments.py``. Adding a
family is one entry in :data:`FAMILIES` once an exactness test against the unsplit model passes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

FULL = "full_attention"
SLIDING = "sliding_attention"


class UnsupportedModelError(ValueError):
    """The model's architecture is not one whose decoder layers fedsplit can run in segments."""


def _get(config: Any, name: str, default: Any = None) -> Any:
    """A config value from a ``PretrainedConfig`` or a raw ``config.json`` dict."""
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def all_full(config) -> list[str]:
    """Every layer attends to the whole prefix (Llama, Gemma, OLMo 2, Granite, ...)."""
    return [FULL] * int(config.num_hidden_layers)


def window_everywhere(config) -> list[str]:
    """Every layer slides when ``config.sliding_window`` is set (Mistral, Mixtral, Phi-3, ...)."""
    kind = FULL if _get(config, "sliding_window") is None else SLIDING
    return [kind] * int(config.num_hidden_layers)


def from_layer_types(config) -> list[str]:
    """Each layer's kind is ``config.layer_types[i]`` (Gemma 2/3, Qwen2/3, Cohere2, OLMo 3, ...)."""
    return list(config.layer_types)


def _bidirectional(config) -> str | None:
    if _get(config, "use_bidirectional_attention"):
        return "it attends bidirectionally (an embedding model), not causally"
    return None


@dataclass(frozen=True)
class Family:
    """The between-layer behaviour of one ``model_type``; defaults are Llama's (none at all)."""

    model_type: str = field(metadata={"help": "config.model_type this entry covers"})
    layer_kinds: Callable[[Any], list[str]] = field(
        default=all_full,
        metadata={
            "help": "config -> each layer's attention kind, FULL or SLIDING (window config.sliding_window)"
        },
    )
    rotary_per_kind: bool = field(
        default=False,
        metadata={"help": "the rotary embedding takes the layer kind: rotary_emb(x, positions, kind)"},
    )
    embedding_multiplier: str | None = field(
        default=None, metadata={"help": "config attribute the embeddings are multiplied by (Granite)"}
    )
    embedding_dropout: str | None = field(
        default=None, metadata={"help": "config attribute: dropout probability on the embeddings in training"}
    )
    final_norm: str = field(default="norm", metadata={"help": "attribute name of the decoder's final norm"})
    logit_multiplier: str | None = field(
        default=None, metadata={"help": "config attribute the logits are multiplied by (Cohere)"}
    )
    logit_divisor: str | None = field(
        default=None, metadata={"help": "config attribute the logits are divided by (Granite)"}
    )
    logit_softcap: str | None = field(
        default=None,
        metadata={"help": "config attribute c: logits -> c * tanh(logits / c) when set (Gemma 2/3)"},
    )
    refuse: Callable[[Any], str | None] | None = field(
        default=None, metadata={"help": "config -> why this variant cannot run in segments, or None"}
    )

    def scale_embeddings(self, hidden: torch.Tensor, config, training: bool = False) -> torch.Tensor:
        """What the family's ``Model.forward`` does to the embeddings before the first layer."""
        if self.embedding_multiplier is not None:
            hidden = hidden * getattr(config, self.embedding_multiplier)
        if self.embedding_dropout is not None and training:
            hidden = torch.nn.functional.dropout(
                hidden, p=getattr(config, self.embedding_dropout), training=True
            )
        return hidden

    def finish_logits(self, logits: torch.Tensor, config) -> torch.Tensor:
        """What the family's ``ForCausalLM.forward`` does to the LM head's output."""
        if self.logit_multiplier is not None:
            logits = logits * getattr(config, self.logit_multiplier)
        if self.logit_divisor is not None:
            logits = logits / getattr(config, self.logit_divisor)
        cap = getattr(config, self.logit_softcap) if self.logit_softcap is not None else None
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family("llama"),
        Family("mistral", layer_kinds=window_everywhere),
        Family("qwen2", layer_kinds=from_layer_types),
        Family("qwen3", layer_kinds=from_layer_types),
        Family("gemma"),  # the sqrt(hidden) embedding scale lives inside its embedding module
        Family("gemma2", layer_kinds=from_layer_types, logit_softcap="final_logit_softcapping"),
        Family(
            "gemma3_text",
            layer_kinds=from_layer_types,
            rotary_per_kind=True,
            logit_softcap="final_logit_softcapping",
            refuse=_bidirectional,
        ),
        Family("phi3", layer_kinds=window_everywhere),
        Family("olmo2"),
        Family("granite", embedding_multiplier="embedding_multiplier", logit_divisor="logits_scaling"),
        Family("mixtral", layer_kinds=window_everywhere),
        Family("qwen2_moe", layer_kinds=from_layer_types),
        Family("qwen3_moe", layer_kinds=window_everywhere),
        Family("olmo"),
        Family("olmo3", layer_kinds=from_layer_types, rotary_per_kind=True),
        Family("cohere", logit_multiplier="logit_scale"),
        Family("cohere2", layer_kinds=from_layer_types, logit_multiplier="logit_scale"),
        Family("stablelm"),
        Family("starcoder2", layer_kinds=window_everywhere, embedding_dropout="embedding_dropout"),
        Family("glm"),
        Family("glm4"),
        Family("smollm3", layer_kinds=from_layer_types),
        Family("phi", final_norm="final_layernorm", embedding_dropout="embd_pdrop"),
        Family("exaone4", layer_kinds=from_layer_types),
        Family("granitemoe", embedding_multiplier="embedding_multiplier", logit_divisor="logits_scaling"),
        Family("ministral", layer_kinds=from_layer_types),
        Family("helium"),
        Family("apertus"),
        Family("arcee"),
        Family("seed_oss"),
        Family("ernie4_5"),
        Family("hunyuan_v1_dense"),
    )
}

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(FAMILIES)


def unsupported(model_type: object, reason: str | None = None) -> UnsupportedModelError:
    """The one-line error for a model fedsplit cannot split, naming what it can."""
    why = f"{reason}; " if reason else ""
    return UnsupportedModelError(
        f"model type {model_type!r} is not supported: {why}fedsplit runs the decoder layers of "
        f"{', '.join(SUPPORTED_FAMILIES)} models (SmolLM/SmolLM2 count as llama); pick one of those."
    )


def family_of(config) -> Family:
    """The :class:`Family` of ``config`` (a ``PretrainedConfig`` or a ``config.json`` dict).

    Raises :class:`UnsupportedModelError` for an unknown ``model_type``, for a variant the family
    refuses, and for layer kinds other than full or sliding-window attention.
    """
    model_type = _get(config, "model_type")
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise unsupported(model_type)
    reason = family.refuse(config) if family.refuse is not None else None
    if reason is None and not isinstance(config, Mapping) and hasattr(config, "num_hidden_layers"):
        odd = sorted(set(family.layer_kinds(config)) - {FULL, SLIDING})
        if odd:
            reason = f"its layers use {', '.join(odd)}, and only full and sliding-window attention split"
    if reason is not None:
        raise unsupported(model_type, reason)
    return family


def attention_implementation(config) -> str:
    """``"sdpa"``, or ``"eager"`` where attention logits are soft-capped (sdpa cannot do that).

    The unsplit reference must be loaded with the same implementation for exact comparisons.
    """
    return "eager" if _get(config, "attn_logit_softcapping") is not None else "sdpa"
