"""Named LoRA adapters on one shared body: one per session, per client, or shared by all.

peft keeps several adapters side by side on the same frozen base layers; only the
active ones take part in a forward. Body compute is serialised on one worker, so
switching the active adapter before each call is safe. :meth:`AdapterPool.rows` runs one
forward in which each batch row goes through its own adapter (server-hierarchical
training batches its replicas' forwards that way).
"""

from __future__ import annotations

import contextlib
import threading

import torch
from peft import inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer, cast_adapter_dtype
from torch import nn

from ..model.lora import LoraSettings, seed_lora
from .placement import body_placement

_STALE = object()  # forces the next activate() to set every layer


class AdapterPool:
    """Create, activate, read, write, average and delete named adapters on ``body``.

    ``device`` and ``dtype`` are the body's (its frozen weights'); adapters live on that device
    in fp32 whatever the body's dtype.
    """

    def __init__(self, body: nn.Module) -> None:
        self.body = body
        self.device, self.dtype = body_placement(body)
        self.settings: dict[str, LoraSettings] = {}
        self.lock = threading.RLock()
        self._active: object = None  # the active adapter name; _STALE after the layers changed
        self._layers: list | None = None
        for p in body.parameters():
            p.requires_grad_(False)

    def _tuner_layers(self):
        if self._layers is None:
            self._layers = [m for m in self.body.modules() if isinstance(m, BaseTunerLayer)]
        return self._layers

    def create(self, name: str, settings: LoraSettings, seed: int | None = None) -> None:
        if name in self.settings:
            raise ValueError(f"adapter {name!r} exists")
        with self.lock:
            if not any(n.rsplit(".", 1)[-1] in settings.targets for n, _ in self.body.named_modules()):
                self.settings[name] = settings  # an empty body span: nothing to adapt
                return
            inject_adapter_in_model(settings.peft_config(), self.body, adapter_name=name)
            cast_adapter_dtype(self.body, name)  # fp32 on a bf16/fp16 body, as on the client (add_lora)
            if seed is not None:
                seed_lora(self.body, seed, name)
            self.settings[name] = settings
            # Every adapter's weights stay trainable (whatever the injection did to the others'),
            # base weights frozen; activate() then only switches which adapter runs.
            for pname, p in self.body.named_parameters():
                if "lora_" in pname:
                    p.requires_grad_(True)
            self._layers, self._active = None, _STALE
            self.activate(None)

    def parameters(self, name: str) -> list[nn.Parameter]:
        suffix = f".{name}.weight"
        return [p for pname, p in self.body.named_parameters() if "lora_" in pname and pname.endswith(suffix)]

    def activate(self, name: str | None) -> None:
        """Make ``name`` the only active adapter (None: plain base weights).

        Sets each tuner layer's active adapter directly. peft's ``set_adapter`` and
        ``enable_adapters`` also toggle ``requires_grad`` on every adapter of the layer — work
        that grows with the number of adapters (tens of ms per call with one replica per
        client) and that this pool does not want: adapter weights stay trainable, base
        weights frozen, from ``create`` on.
        """
        if name == self._active:
            return
        for layer in self._tuner_layers():
            layer._disable_adapters = name is None
            if name is not None:
                layer._active_adapter = [name]
        self._active = name

    @contextlib.contextmanager
    def rows(self, names: list[str]):
        """Forwards inside the block send batch row ``i`` through adapter ``names[i]``.

        Every LoRA layer runs its base weights on the whole batch (adapters disabled) and a
        forward hook adds each adapter's low-rank update to its own rows. Rows of one adapter
        must be contiguous. When every adapter has as many rows and the same rank (one replica
        per client, equal batches) the updates of all adapters are two batched matmuls;
        otherwise one small product per adapter. Differentiable: each adapter's weights get
        the gradient of its own rows only.
        """
        groups: list[tuple[str, int, int]] = []
        for i, name in enumerate(names):
            if groups and groups[-1][0] == name and groups[-1][2] == i:
                groups[-1] = (name, groups[-1][1], i + 1)
            elif any(g[0] == name for g in groups):
                raise ValueError(f"the rows of adapter {name!r} are not contiguous")
            else:
                groups.append((name, i, i + 1))

        names = [name for name, _, _ in groups]
        even = len({stop - start for _, start, stop in groups}) == 1  # as many rows per adapter

        def add_updates(layer, args, output):
            return output + _low_rank_updates(layer, args[0], groups, names, even, output)

        layers = self._tuner_layers()
        handles = [layer.register_forward_hook(add_updates) for layer in layers]
        for layer in layers:
            layer._disable_adapters = True
        self._active = _STALE
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter weights keyed like a saved peft adapter (``layers.<i>...lora_A.weight``)."""
        suffix = f".{name}.weight"
        return {
            pname.removesuffix(suffix) + ".weight": p.detach().clone()
            for pname, p in self.body.named_parameters()
            if "lora_" in pname and pname.endswith(suffix)
        }

    def load_state_dict(self, name: str, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.body.named_parameters())
        with torch.no_grad():
            for key, value in state.items():
                target = key.removesuffix(".weight") + f".{name}.weight"
                if target not in params:
                    raise KeyError(f"adapter weight {key} does not match any body module")
                params[target].copy_(value)

    def average(self, names: list[str], weights: list[float], into: list[str] | None = None) -> None:
        """FedAvg: write the weighted mean of ``names`` into every adapter of ``into`` (default: names)."""
        total = float(sum(weights))
        if total <= 0:
            raise ValueError("FedAvg weights must sum to a positive number")
        states = [self.state_dict(n) for n in names]
        mean = {k: sum(s[k] * (w / total) for s, w in zip(states, weights)) for k in states[0]}
        for name in into or names:
            self.load_state_dict(name, mean)

    def delete(self, name: str) -> None:
        with self.lock:
            for layer in self._tuner_layers():
                if name in getattr(layer, "lora_A", {}):
                    layer.delete_adapter(name)
            self.settings.pop(name, None)
            self._layers, self._active = None, _STALE


def _low_rank_updates(
    layer,
    x: torch.Tensor,
    groups: list[tuple[str, int, int]],
    names: list[str],
    even: bool,
    like: torch.Tensor,
) -> torch.Tensor:
    """``scaling * B(A(x))`` of each group's adapter on the group's rows of ``x`` (zeros where it has none)."""
    batched = (
        even
        and all(n in layer.lora_A for n in names)
        and len({layer.r[n] for n in names}) == 1
        and all(isinstance(layer.lora_dropout[n], nn.Identity) for n in names)
    )
    if batched:  # [adapters, rows * tokens, features] through stacked A and B
        a = torch.stack([layer.lora_A[n].weight for n in names])
        b = torch.stack([layer.lora_B[n].weight for n in names])
        scale = torch.tensor([float(layer.scaling[n]) for n in names], dtype=a.dtype, device=a.device)
        rows = x.reshape(len(names), -1, x.shape[-1]).to(a.dtype)  # adapters are fp32 on a bf16 body
        low = torch.bmm(rows, a.transpose(1, 2)) * scale.view(-1, 1, 1)
        return torch.bmm(low, b.transpose(1, 2)).reshape(like.shape).to(like.dtype)
    parts = []
    for name, start, stop in groups:
        if name in layer.lora_A:
            lora_a = layer.lora_A[name]
            part = lora_a(layer.lora_dropout[name](x[start:stop]).to(lora_a.weight.dtype))
            parts.append((layer.lora_B[name](part) * layer.scaling[name]).to(like.dtype))
        else:
            parts.append(torch.zeros_like(like[start:stop]))
    return torch.cat(parts)
