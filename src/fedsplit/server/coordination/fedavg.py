"""FedAvg: the example-weighted mean of adapter state dicts.

Clients with different partition points hold different layers (a client with ``p = 1``
has no head LoRA for layer 1, which a ``p = 2`` client trains). So the mean is taken
key by key, over the states that hold the key: a layer's adapter is averaged among the
parties that actually train it, and nobody's weights are diluted by an untrained copy.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(key: str) -> int | None:
    """The decoder layer a parameter name belongs to (``layers.7.self_attn...`` -> 7), or None."""
    match = _LAYER.search(key)
    return int(match.group(1)) if match else None


def restrict(state: Mapping[str, torch.Tensor], span: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The entries of ``state`` whose layer lies in ``[span[0], span[1])`` (layer-less keys are kept)."""
    start, end = span
    return {k: v for k, v in state.items() if (layer := layer_of(k)) is None or start <= layer < end}


def weighted_average(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Key-wise weighted mean of ``states``; each key is averaged over the states that hold it.

    ``weights`` are typically the number of training examples behind each state. If the
    states holding a key all have weight 0, they count equally (a party that trained on
    nothing still gets a defined average). Shapes must agree per key.
    """
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    if any(w < 0 for w in weights):
        raise ValueError("FedAvg weights must be non-negative")
    keys: dict[str, None] = {}
    for state in states:
        keys.update(dict.fromkeys(state))
    mean: dict[str, torch.Tensor] = {}
    for key in keys:
        holders = [(s[key], float(w)) for s, w in zip(states, weights) if key in s]
        shapes = {tuple(t.shape) for t, _ in holders}
        if len(shapes) > 1:
            raise ValueError(f"cannot average {key}: the states disagree on its shape {sorted(shapes)}")
        total = sum(w for _, w in holders)
        if total <= 0:
            holders, total = [(t, 1.0) for t, _ in holders], float(len(holders))
        acc = torch.zeros_like(holders[0][0], dtype=torch.float64)
        for tensor, w in holders:
            acc += tensor.double() * (w / total)
        mean[key] = acc.to(holders[0][0].dtype)
    return mean
