"""Shape presets: a real model's shape with seeded random weights, written shard by shard (never the 13 GB one)."""

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from fedsplit.model import loading, presets
from fedsplit.model.loading import PRESETS, load_tokenizer, model_fingerprint, resolve_checkpoint
from fedsplit.model.presets import (
    INDEX,
    LLAMA2_7B_SHAPE,
    ShapePreset,
    checkpoint_bytes,
    parameter_count,
    shape_config,
    write_shape_preset,
)
from fedsplit.model.split import load_part, load_split

SMALL = {
    "vocab_size": 300,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def small_config() -> LlamaConfig:
    return LlamaConfig(**SMALL)


def digests(path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.glob("*.safetensors"))}


def test_llama2_7b_shape_has_the_published_shape_and_size():
    config = shape_config(LLAMA2_7B_SHAPE)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (4096, 32, 32)
    assert (config.intermediate_size, config.vocab_size, config.max_position_embeddings) == (
        11008,
        32000,
        4096,
    )
    assert config.num_key_value_heads == 32 and config.rms_norm_eps == 1e-5
    assert config.tie_word_embeddings is False and config.model_type == "llama"
    assert parameter_count(config) == 6_738_415_616  # LLaMA-2-7B's parameter count
    assert checkpoint_bytes(config) == 2 * 6_738_415_616  # bf16
    assert LLAMA2_7B_SHAPE in PRESETS


def test_the_preset_tokenizer_fits_inside_the_32000_id_vocabulary():
    tokenizer = loading._tiny_tokenizer()
    assert len(tokenizer) <= shape_config(LLAMA2_7B_SHAPE).vocab_size
    assert tokenizer.decode(tokenizer("shape, not quality")["input_ids"]) == "shape, not quality"


def test_weights_are_written_one_file_per_layer_plus_one_with_an_index(tmp_path):
    write_shape_preset(small_config(), tmp_path, seed=0)
    files = sorted(f.name for f in tmp_path.glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((tmp_path / INDEX).read_text())
    expected_names = set(LlamaForCausalLM(small_config()).state_dict())
    assert set(index["weight_map"]) == expected_names
    # Each layer sits alone in its file; the embedding, final norm and LM head share the first.
    for name, file in index["weight_map"].items():
        if name.startswith("model.layers."):
            assert file == files[1 + int(name.split(".")[2])], name
        else:
            assert file == files[0], name
    total = 0
    for file in files:
        with safe_open(str(tmp_path / file), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                assert tensor.dtype == torch.bfloat16
                total += tensor.numel() * tensor.element_size()
    assert index["metadata"]["total_size"] == total == checkpoint_bytes(small_config())
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"


def test_the_same_seed_writes_the_same_bytes_and_another_seed_other_weights(tmp_path):
    write_shape_preset(small_config(), tmp_path / "a", seed=7)
    write_shape_preset(small_config(), tmp_path / "b", seed=7)
    write_shape_preset(small_config(), tmp_path / "c", seed=8)
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    assert all(a != c for a, c in zip(digests(tmp_path / "a").values(), digests(tmp_path / "c").values()))


def test_a_written_preset_loads_part_by_part_like_the_unsplit_model(tmp_path):
    write_shape_preset(small_config(), tmp_path, seed=1)
    body = load_part(str(tmp_path), "body", 1, 1)
    assert body.layer_indices == [1] and {p.dtype for p in body.parameters()} == {torch.float32}
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    unsplit = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        expected = unsplit(ids).logits
        got = load_split(str(tmp_path), 1, 1)(ids)
    assert expected.std() > 0.01  # real random weights, not zeros
    assert (got - expected).abs().max().item() <= 1e-5


def test_resolve_checkpoint_writes_a_shape_preset_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSPLIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(presets.SHAPE_PRESETS, LLAMA2_7B_SHAPE, ShapePreset(config=SMALL, seed=5))
    writes = []

    def counting_write(*args, **kwargs):
        writes.append(args)
        return write_shape_preset(*args, **kwargs)

    monkeypatch.setattr(loading, "write_shape_preset", counting_write)
    path = resolve_checkpoint(LLAMA2_7B_SHAPE)
    assert path.parent == tmp_path / "cache" and path.name.startswith(LLAMA2_7B_SHAPE)
    assert resolve_checkpoint(LLAMA2_7B_SHAPE) == path and len(writes) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]  # no temporary leftovers
    tokenizer = load_tokenizer(LLAMA2_7B_SHAPE)
    assert tokenizer.decode(tokenizer("hi")["input_ids"]) == "hi"
    head = load_part(LLAMA2_7B_SHAPE, "head", 1, 1, dtype="bf16")
    assert {p.dtype for p in head.parameters()} == {torch.bfloat16}
    assert len(model_fingerprint(LLAMA2_7B_SHAPE)) == 16


def test_a_shape_preset_is_not_written_where_the_disk_is_too_small(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSPLIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(presets.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 10**9})())

    def never(*args, **kwargs):
        raise AssertionError("the 13.5 GB preset must not be written by a test")

    monkeypatch.setattr(loading, "write_shape_preset", never)
    with pytest.raises(OSError, match="needs 13.5 GB.*FEDSPLIT_CACHE") as info:
        resolve_checkpoint(LLAMA2_7B_SHAPE)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
