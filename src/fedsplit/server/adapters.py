"""Named LoRA adapters on one shared body: one per session, per client, or shared by all.

peft keeps several adapters side by side on the same frozen base layers; only the
active ones take part in a forward. Body compute is serialised on one worker, so
switching the active adapter before each call is safe.
"""

from __future__ import annotations

import threading

import torch
from peft import inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..model.lora import LoraSettings, seed_lora


class AdapterPool:
    """Create, activate, read, write, average and delete named adapters on ``body``."""

    def __init__(self, body: nn.Module) -> None:
        self.body = body
        self.settings: dict[str, LoraSettings] = {}
        self.lock = threading.RLock()
        for p in body.parameters():
            p.requires_grad_(False)

    def _tuner_layers(self):
        return [m for m in self.body.modules() if isinstance(m, BaseTunerLayer)]

    def create(self, name: str, settings: LoraSettings, seed: int | None = None) -> None:
        if name in self.settings:
            raise ValueError(f"adapter {name!r} exists")
        with self.lock:
            if not any(n.rsplit(".", 1)[-1] in settings.targets for n, _ in self.body.named_modules()):
                self.settings[name] = settings  # an empty body span: nothing to adapt
                return
            inject_adapter_in_model(settings.peft_config(), self.body, adapter_name=name)
            if seed is not None:
                seed_lora(self.body, seed, name)
            self.settings[name] = settings
            for pname, p in self.body.named_parameters():
                if f".{name}." in pname:
                    p.requires_grad_(True)
            self.activate(None)

    def parameters(self, name: str) -> list[nn.Parameter]:
        suffix = f".{name}.weight"
        return [p for pname, p in self.body.named_parameters() if "lora_" in pname and pname.endswith(suffix)]

    def activate(self, name: str | None) -> None:
        """Make ``name`` the only active adapter (None: plain base weights)."""
        for layer in self._tuner_layers():
            if name is None:
                layer.enable_adapters(False)
            else:
                layer.enable_adapters(True)
                layer.set_adapter(name)
                # set_adapter marks the adapter trainable; keep base weights frozen and others untouched.
                for other in self.settings:
                    for p in self._layer_params(layer, other):
                        p.requires_grad_(True)

    @staticmethod
    def _layer_params(layer, name):
        for attr in ("lora_A", "lora_B"):
            modules = getattr(layer, attr, {})
            if name in modules:
                yield from modules[name].parameters()

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
