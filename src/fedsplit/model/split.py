"""Cut a causal LM into head, body and tail, in memory or straight from a checkpoint."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .device import resolve_device, resolve_dtype
from .families import attention_implementation, family_of
from .loading import SUPPORTED_FAMILIES, UnsupportedModelError, resolve_checkpoint
from .segments import Body, Head, KVCache, Tail

log = logging.getLogger(__name__)


class SplitError(ValueError):
    """Invalid partition points."""


def num_layers(config) -> int:
    return int(config.num_hidden_layers)


def check_partition(n_layers: int, head_layers: int, tail_layers: int) -> None:
    """Raise SplitError unless 0 <= p, 0 <= q and p + q <= N (the body may be empty only if N = p + q)."""
    for name, value in (("head_layers", head_layers), ("tail_layers", tail_layers)):
        if not isinstance(value, int) or value < 0:
            raise SplitError(f"{name} must be a non-negative integer, got {value!r}")
    if head_layers + tail_layers > n_layers:
        raise SplitError(
            f"head_layers + tail_layers = {head_layers + tail_layers} exceeds the model's {n_layers} layers; "
            f"choose p + q <= {n_layers}"
        )


def body_span(n_layers: int, head_layers: int, tail_layers: int) -> tuple[int, int]:
    check_partition(n_layers, head_layers, tail_layers)
    return head_layers, n_layers - tail_layers


def _decoder(model: nn.Module) -> nn.Module:
    decoder = getattr(model, "model", None)
    if decoder is None or not hasattr(decoder, "layers") or not hasattr(model, "lm_head"):
        raise UnsupportedModelError(
            f"{type(model).__name__} does not have the decoder layout fedsplit runs; "
            f"supported families: {', '.join(SUPPORTED_FAMILIES)}"
        )
    return decoder


@dataclass
class SplitModel:
    """The three segments of one model, as a data owner plus compute owner would hold them."""

    head: Head
    body: Body
    tail: Tail
    config: object

    @property
    def head_layers(self) -> int:
        return len(self.head.layers)

    @property
    def tail_layers(self) -> int:
        return len(self.tail.layers)

    def parameters(self):
        for segment in (self.head, self.body, self.tail):
            yield from segment.parameters()

    def new_caches(self) -> tuple[KVCache, KVCache, KVCache]:
        return KVCache(), KVCache(), KVCache()

    def forward(self, input_ids, pad_lengths=None, caches=None) -> torch.Tensor:
        """head -> body -> tail in one process; returns logits."""
        head_cache, body_cache, tail_cache = caches or (None, None, None)
        hidden = self.head(input_ids, pad_lengths, head_cache)
        hidden = self.body(hidden, pad_lengths, body_cache)
        return self.tail(hidden, pad_lengths, tail_cache)

    __call__ = forward

    def repartition(self, head_layers: int, tail_layers: int) -> None:
        """Move decoder blocks between segments (with any LoRA weights on them)."""
        n = num_layers(self.config)
        check_partition(n, head_layers, tail_layers)
        blocks = {}
        for segment in (self.head, self.body, self.tail):
            blocks.update({int(i): layer for i, layer in segment.layers.items()})
            segment.layers.clear()
        if sorted(blocks) != list(range(n)):
            raise SplitError("repartition needs all layers in this process; the body is remote")
        self.body.start, self.tail.start = head_layers, n - tail_layers
        for i in range(n):
            target = self.head if i < head_layers else self.tail if i >= n - tail_layers else self.body
            target.layers[str(i)] = blocks[i]


def split(model: nn.Module, head_layers: int, tail_layers: int) -> SplitModel:
    """Cut an in-memory Hugging Face causal LM into head, body and tail.

    The segments share the model's modules (no copy); drop the model afterwards.
    """
    family = family_of(model.config)
    decoder = _decoder(model)
    n = len(decoder.layers)
    start, end = body_span(n, head_layers, tail_layers)
    layers = dict(enumerate(decoder.layers))
    head = Head(
        decoder.embed_tokens,
        {i: layers[i] for i in range(0, start)},
        copy.deepcopy(decoder.rotary_emb),
        model.config,
    )
    body = Body(
        {i: layers[i] for i in range(start, end)}, copy.deepcopy(decoder.rotary_emb), model.config, start
    )
    tail = Tail(
        {i: layers[i] for i in range(end, n)},
        getattr(decoder, family.final_norm),
        model.lm_head,
        copy.deepcopy(decoder.rotary_emb),
        model.config,
    )
    return SplitModel(head, body, tail, model.config)


# ---------------------------------------------------------------- loading one part only


def _weight_files(ckpt: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it."""
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: ckpt / file for name, file in weight_map.items()}
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {ckpt}; fedsplit loads safetensors only")
    names = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            names.update({name: file for name in f.keys()})
    return names


def _fill_constants(skeleton: nn.Module, module: nn.Module, device: torch.device) -> None:
    """Make ``module``'s non-persistent buffers real on ``device`` and set them as the model class does.

    No checkpoint holds them (e.g. Gemma's embedding scale); transformers sets them with the model's
    own ``_init_weights`` after loading on meta, and so do we. Call before the weights are loaded:
    ``_init_weights`` also re-draws the owner's parameters. The skeleton is built under
    ``torch.device("meta")``, which, unlike patching ``nn.Module`` globally, touches only this thread.
    """
    for owner in module.modules():
        names = [n for n in owner._non_persistent_buffers_set if owner._buffers.get(n) is not None]
        for name in names:
            owner._buffers[name] = torch.empty_like(owner._buffers[name], device=device)
        if names:
            skeleton._init_weights(owner)


def _load_converted(
    skeleton: nn.Module, modules: dict[str, nn.Module], files: dict[str, Path], device, dtype
) -> None:
    """Load ``modules`` (keyed by name prefix) of ``skeleton`` through transformers' checkpoint conversion.

    transformers >= 5 saves some layers in their original checkpoint layout (e.g. one tensor per MoE
    expert) and converts them while loading; only those files' tensors under ``modules`` are read.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    prefixes = tuple(f"{prefix}." for prefix in modules)
    with contextlib.ExitStack() as stack:
        handles: dict[Path, object] = {}
        state = {}
        for key, file in files.items():
            if key.startswith(prefixes):
                if file not in handles:
                    handles[file] = stack.enter_context(safe_open(str(file), framework="pt"))
                state[key] = handles[file].get_slice(key)  # read when converted, not before
        config = LoadStateDictConfig(
            weight_mapping=get_model_conversion_mapping(skeleton), device_map={"": device}, dtype=dtype
        )
        info, _ = convert_and_load_state_dict_in_model(model=skeleton, state_dict=state, load_config=config)
    missing = sorted(key for key in info.missing_keys if key.startswith(prefixes))
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} weights this part needs, e.g. {missing[0]}")
    for module in modules.values():
        for owner in module.modules():  # buffers; the parameters are loaded already
            for name, buffer in owner._buffers.items():
                if buffer is not None and buffer.is_meta:
                    if any(True for _ in owner.parameters(recurse=False)):
                        raise ValueError(f"cannot rebuild buffer {name} of {type(owner).__name__} here")
                    _fill_constants(skeleton, owner, device)
                elif buffer is not None:
                    owner._buffers[name] = buffer.to(device)


def load_part(
    spec: str,
    part: str,
    head_layers: int = 0,
    tail_layers: int = 0,
    span: tuple[int, int] | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
) -> Head | Body | Tail:
    """Load only the weights one party needs: ``part`` is "head", "body" or "tail".

    For "body", ``span`` overrides the layers held (a server may hold a wider span
    than any one client uses). Nothing else is materialised: the server never holds
    the embedding or LM head, a client never holds body layers. Weights are read from
    the safetensors files straight onto ``device`` and converted to ``dtype`` there
    (both also accept the words of :mod:`fedsplit.model.device`, e.g. "auto", "bf16").
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    ckpt = resolve_checkpoint(spec)
    config = AutoConfig.from_pretrained(ckpt)
    family = family_of(config)
    config._attn_implementation = attention_implementation(config)
    n = num_layers(config)
    start, end = span if span is not None else body_span(n, head_layers, tail_layers)
    if part == "body" and not (0 <= start <= end <= n):
        raise SplitError(f"body span [{start}, {end}) is outside the model's {n} layers")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    decoder = _decoder(skeleton)
    if part == "head":
        modules = {"model.embed_tokens": decoder.embed_tokens}
        wanted = range(0, start)
    elif part == "body":
        modules = {}
        wanted = range(start, end)
    elif part == "tail":
        modules = {
            f"model.{family.final_norm}": getattr(decoder, family.final_norm),
            "lm_head": skeleton.lm_head,
        }
        wanted = range(end, n)
    else:
        raise ValueError(f"part must be head, body or tail, not {part!r}")
    modules.update({f"model.layers.{i}": decoder.layers[i] for i in wanted})

    files = _weight_files(ckpt)
    # Tied embeddings: the LM head reads the embedding matrix.
    aliases = {}
    if "lm_head.weight" not in files and config.tie_word_embeddings:
        aliases["lm_head.weight"] = "model.embed_tokens.weight"
    # Modules stored under other names (MoE experts saved one by one, fused by transformers on
    # load) go through transformers' own conversion; all others are read tensor by tensor.
    converted = {
        prefix: module
        for prefix, module in modules.items()
        if any(
            aliases.get(f"{prefix}.{name}", f"{prefix}.{name}") not in files for name in module.state_dict()
        )
    }
    if converted:
        _load_converted(skeleton, converted, files, device, dtype)
        modules = {prefix: module for prefix, module in modules.items() if prefix not in converted}
    # Which tensors each file must give, so that each file is opened once.
    by_file: dict[Path, list[tuple[nn.Module, str, str]]] = {}
    for prefix, module in modules.items():
        module.to_empty(device=device)
        _fill_constants(skeleton, module, device)
        for name in module.state_dict():
            source = aliases.get(f"{prefix}.{name}", f"{prefix}.{name}")
            by_file.setdefault(files[source], []).append((module, name, source))
    states: dict[nn.Module, dict[str, torch.Tensor]] = {module: {} for module in modules.values()}
    for file, entries in by_file.items():
        with safe_open(str(file), framework="pt") as f:  # memory-mapped: nothing is read twice
            for module, name, source in entries:
                states[module][name] = f.get_tensor(source).to(device=device, dtype=dtype)
    for module, state in states.items():
        module.load_state_dict(state)
    # Rotary frequencies stay fp32 (they are cast per call); only their device follows the weights.
    rotary = type(decoder.rotary_emb)(config=config).to(device)
    layers = {i: decoder.layers[i] for i in wanted}
    if part == "head":
        segment = Head(decoder.embed_tokens, layers, rotary, config)
    elif part == "body":
        segment = Body(layers, rotary, config, start)
    else:
        segment = Tail(layers, getattr(decoder, family.final_norm), skeleton.lm_head, rotary, config)
    del skeleton
    return segment.eval()


def load_client_parts(
    spec: str,
    head_layers: int,
    tail_layers: int,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
):
    """Head and tail for one data owner; a tied LM head shares the head's embedding (held once)."""
    head = load_part(spec, "head", head_layers, tail_layers, dtype=dtype, device=device)
    tail = load_part(spec, "tail", head_layers, tail_layers, dtype=dtype, device=device)
    if getattr(head.config, "tie_word_embeddings", False):
        tail.lm_head.weight = head.embed_tokens.weight
    return head, tail


def load_split(
    spec: str,
    head_layers: int,
    tail_layers: int,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
) -> SplitModel:
    """Load head, body and tail from a checkpoint (all three in this process)."""
    head = load_part(spec, "head", head_layers, tail_layers, dtype=dtype, device=device)
    body = load_part(spec, "body", head_layers, tail_layers, dtype=dtype, device=device)
    tail = load_part(spec, "tail", head_layers, tail_layers, dtype=dtype, device=device)
    return SplitModel(head, body, tail, head.config)


def layer_parameter_counts(spec: str) -> list[int]:
    """Parameters of each decoder layer of ``spec``, from its config (a skeleton on the meta device:
    nothing is read or allocated). Pipeline stages of the body are balanced by these counts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolve_checkpoint(spec))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return [sum(p.numel() for p in layer.parameters()) for layer in _decoder(skeleton).layers]
