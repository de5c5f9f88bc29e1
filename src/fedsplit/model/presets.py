"""Random-weight checkpoints with the shape of real models: for speed and memory, never for quality.

A shape preset has a real model's published architecture (layers, widths, heads, vocabulary)
and seeded random weights, so benchmarks can measure what a model of that size costs —
latency, memory, bytes on the wire — without downloading it. Its outputs are noise: never
use one to judge quality. The weights are written shard by shard (one safetensors file per
decoder layer, one for the embedding, final norm and LM head, plus the index), each shard
built, saved and freed before the next, so writing a 7B-shaped model needs the memory of
one layer, not of the model. :func:`fedsplit.model.loading.resolve_checkpoint` builds a
preset once into the cache and reuses it.
"""

from __future__ import annotations

import copy
import json
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

LLAMA2_7B_SHAPE = "llama2-7b-shape"
SHARD_DTYPE = torch.bfloat16  # what is written; loading converts to the dtype asked for
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class ShapePreset:
    """A named architecture with random weights from ``seed``."""

    config: dict = field(metadata={"help": "LlamaConfig keyword arguments"})
    seed: int = field(default=0, metadata={"help": "seed of the random weights"})
    about: str = field(default="", metadata={"help": "what the shape is taken from"})


SHAPE_PRESETS = {
    LLAMA2_7B_SHAPE: ShapePreset(
        about="LLaMA-2-7B (Touvron et al. 2023): 6.74B parameters, 13.5 GB in bf16",
        config={
            "vocab_size": 32000,
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "tie_word_embeddings": False,
            # The ids of the byte tokenizer the preset ships (ids 0-260 of the 32000 are used).
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    ),
}


def shape_config(name: str) -> LlamaConfig:
    """The config of shape preset ``name`` (weights are written in bf16)."""
    return LlamaConfig(**SHAPE_PRESETS[name].config, dtype=SHARD_DTYPE)


def _skeleton(config: LlamaConfig) -> dict[str, torch.Size]:
    """Every tensor name the model's state dict has, with its shape; nothing is allocated."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def parameter_count(config: LlamaConfig) -> int:
    """How many numbers the checkpoint holds (computed from the shapes, without building anything)."""
    return sum(shape.numel() for shape in _skeleton(config).values())


def checkpoint_bytes(config: LlamaConfig) -> int:
    """Bytes of the weight files once written (bf16)."""
    return parameter_count(config) * torch.finfo(SHARD_DTYPE).bits // 8


def _shards(config: LlamaConfig) -> list[dict[str, torch.Size]]:
    """Shard 0: embedding, final norm, LM head; shard 1 + i: decoder layer i."""
    shards: list[dict[str, torch.Size]] = [{} for _ in range(config.num_hidden_layers + 1)]
    for name, shape in _skeleton(config).items():
        if name.startswith("model.layers."):
            shards[1 + int(name.split(".")[2])][name] = shape
        else:
            shards[0][name] = shape
    return shards


def _random_tensor(name: str, shape: torch.Size, seed: int, std: float) -> torch.Tensor:
    """Norm weights are ones; every matrix is N(0, std²) from a generator seeded by (seed, name).

    Seeding per tensor makes each shard's content independent of the order shards are written.
    """
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=SHARD_DTYPE)
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return (torch.randn(shape, generator=generator) * std).to(SHARD_DTYPE)


def write_shape_preset(config: LlamaConfig, path: str | Path, seed: int = 0) -> Path:
    """Write ``config.json``, one bf16 safetensors file per shard, and the index into ``path``.

    Only one shard's tensors are in memory at a time. Same ``config`` and ``seed``: the same
    bytes. The tokenizer is the caller's business.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards = _shards(config)
    weight_map, total = {}, 0
    for number, shapes in enumerate(shards, start=1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {
            name: _random_tensor(name, shape, seed, config.initializer_range)
            for name, shape in shapes.items()
        }
        save_file(tensors, str(path / filename), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, filename))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    saved = copy.deepcopy(config)
    saved.dtype = SHARD_DTYPE
    saved.save_pretrained(path)
    return path


def check_free_space(directory: Path, needed: int) -> None:
    """Raise ``OSError`` (one line) unless ``directory``'s file system has ``needed`` bytes free, with margin."""
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed * 1.05:
        raise OSError(
            f"writing this preset needs {needed / 1e9:.1f} GB but {probe} has {free / 1e9:.1f} GB free; "
            f"free some space or point FEDSPLIT_CACHE at a larger disk"
        )
