"""LoRA on each segment (via peft), saved per segment in peft's format, and exported as one adapter."""

from __future__ import annotations

import json
import logging
import math
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import cast_adapter_dtype
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
SEGMENTS = ("head", "body", "tail")
# Parameter names inside a segment start with "layers."; in the unsplit PeftModel they sit under this prefix.
PEFT_PREFIX = "base_model.model.model."


@dataclass
class LoraSettings:
    """LoRA hyper-parameters shared by every segment."""

    rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    targets: tuple[str, ...] = field(
        default=("q_proj", "k_proj", "v_proj", "o_proj"), metadata={"help": "module names LoRA wraps"}
    )

    def peft_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=list(self.targets)
        )


def _has_targets(segment: nn.Module, settings: LoraSettings) -> bool:
    return any(name.rsplit(".", 1)[-1] in settings.targets for name, _ in segment.named_modules())


def seed_lora(module: nn.Module, seed: int, adapter: str = "default") -> None:
    """Initialise every LoRA A matrix from (seed, its layer-global name); B stays zero.

    The same layer gets the same initial adapter whichever segment — or process, device
    or dtype — holds it, so split and centralized runs start identical: the values are
    drawn in fp32 on the CPU, then copied into the adapter where it lives.
    """
    with torch.no_grad():
        for name, param in module.named_parameters():
            if f".lora_A.{adapter}." not in name:
                continue
            key = name.replace(f".{adapter}.", ".")
            key = key[key.index("layers.") :] if "layers." in key else key
            gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
            bound = 1.0 / math.sqrt(param.shape[1])  # peft's kaiming_uniform(a=sqrt(5)) bound
            param.copy_(torch.empty(param.shape).uniform_(-bound, bound, generator=gen))


def add_lora(segment: nn.Module, settings: LoraSettings | None = None, seed: int | None = None) -> nn.Module:
    """Wrap the target linears of ``segment`` with LoRA in place; freeze everything else.

    A segment with no target modules (an embedding-only head, a norm+LM-head-only
    tail) stays frozen and gets no adapter.

    Adapters sit on the device of the layer they wrap and are kept in fp32 whatever the
    base dtype (what peft's ``autocast_adapter_dtype=True`` does): on a bf16 base an
    AdamW step of a bf16 adapter would round most updates away (8 bits of mantissa), while
    fp32 adapters cost next to nothing (rank x width per matrix). peft casts each layer's
    input to fp32 for the low-rank path and the sum back to the base dtype, so hidden
    states keep the base dtype.
    """
    settings = settings or LoraSettings()
    for p in segment.parameters():
        p.requires_grad_(False)
    if _has_targets(segment, settings):
        inject_adapter_in_model(settings.peft_config(), segment)  # on each base layer's device
        cast_adapter_dtype(segment, "default")
        if seed is not None:
            seed_lora(segment, seed)
    return segment


def lora_parameters(segment: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in segment.named_parameters() if "lora_" in name]


def lora_state_dict(segment: nn.Module) -> dict[str, torch.Tensor]:
    """The segment's LoRA weights, keyed as peft saves them (``layers.<i>....lora_A.weight``)."""
    if not lora_parameters(segment):
        return {}
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(segment).items()}


def load_lora_state_dict(segment: nn.Module, state: dict[str, torch.Tensor]) -> None:
    if state:
        result = set_peft_model_state_dict(segment, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"adapter has weights for modules this segment does not hold: {unexpected[:3]}…")


def save_adapter(
    segment: nn.Module | None,
    directory: str | Path,
    settings: LoraSettings,
    state: dict[str, torch.Tensor] | None = None,
    **meta,
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (peft's format).

    Saves ``segment``'s LoRA weights, or ``state`` when given (e.g. a body adapter fetched from a server).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    settings.peft_config().save_pretrained(str(directory))
    config_path = directory / ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    config["fedsplit"] = {"settings": {**asdict(settings), "targets": list(settings.targets)}, **meta}
    config_path.write_text(json.dumps(config, indent=2))
    state = lora_state_dict(segment) if state is None else state
    state = {k: v.contiguous() for k, v in state.items()}
    save_file(state, str(directory / ADAPTER_WEIGHTS))
    return directory


def read_adapter(directory: str | Path) -> tuple[dict[str, torch.Tensor], LoraSettings]:
    directory = Path(directory)
    if not (directory / ADAPTER_WEIGHTS).exists():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {directory}")
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    settings = LoraSettings(
        rank=config["r"],
        alpha=config["lora_alpha"],
        dropout=config.get("lora_dropout", 0.0),
        targets=tuple(sorted(config["target_modules"])),
    )
    return load_file(str(directory / ADAPTER_WEIGHTS)), settings


def export_adapter(adapters: str | Path, out: str | Path, base_model: str | None = None) -> Path:
    """Merge ``adapters/{head,body,tail}`` into one adapter for the unsplit model.

    The result loads with ``PeftModel.from_pretrained(unsplit_model, out)``.
    """
    adapters, out = Path(adapters), Path(out)
    merged: dict[str, torch.Tensor] = {}
    settings = None
    for name in SEGMENTS:
        if not (adapters / name / ADAPTER_WEIGHTS).exists():
            raise FileNotFoundError(
                f"{adapters / name} has no adapter; expected head/, body/ and tail/ as written by fedsplit train"
            )
        state, seg_settings = read_adapter(adapters / name)
        if (
            state
            and settings is not None
            and (seg_settings.rank, seg_settings.alpha)
            != (
                settings.rank,
                settings.alpha,
            )
        ):
            raise ValueError("head, body and tail adapters use different LoRA rank/alpha; cannot merge")
        if state:
            settings = seg_settings
        for key, value in state.items():
            merged[PEFT_PREFIX + key] = value.contiguous()
    if settings is None:
        raise ValueError(f"no LoRA weights found under {adapters}")
    out.mkdir(parents=True, exist_ok=True)
    config = settings.peft_config()
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(out))
    save_file(merged, str(out / ADAPTER_WEIGHTS))
    log.info("exported %d LoRA tensors to %s", len(merged), out)
    return out
