"""Every supported family splits exactly: tiny random checkpoints saved to disk, loaded part by part.

Each family gets a tiny config that exercises what its model class does between layers (sliding
windows shorter than the sequence, alternating layer kinds, embedding and logit scales, soft-caps,
MoE routing); the split model must match the unsplit ``from_pretrained`` model on left-padded
batches and in greedy decoding through the three segments' KV caches.
"""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from fedsplit.model.families import (
    SUPPORTED_FAMILIES,
    UnsupportedModelError,
    attention_implementation,
    family_of,
)
from fedsplit.model.segments import positions_and_mask
from fedsplit.model.split import load_split, split

WINDOW = 5  # shorter than the test sequences, so sliding layers really drop keys
BASE = {
    "vocab_size": 160,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
SLIDE_QWEN = {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2}
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64}
ROPE = {"rope_type": "default", "rope_theta": 10000.0}
ALTERNATE = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
# model_type -> what its tiny config adds to BASE
CONFIGS = {
    "llama": {},
    "mistral": {"sliding_window": WINDOW},
    "qwen2": SLIDE_QWEN,
    "qwen3": SLIDE_QWEN,
    "gemma": {"tie_word_embeddings": True},
    "gemma2": {
        "sliding_window": WINDOW,
        "layer_types": ALTERNATE,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 0.5,
        "query_pre_attn_scalar": 16,
    },
    "gemma3_text": {
        "sliding_window": WINDOW,
        "layer_types": ALTERNATE,
        "final_logit_softcapping": 0.5,
        "query_pre_attn_scalar": 16,
        "tie_word_embeddings": True,
    },
    "phi3": {"sliding_window": WINDOW},
    "olmo2": {},
    "granite": {
        "embedding_multiplier": 12.0,
        "logits_scaling": 8.0,
        "residual_multiplier": 0.22,
        "attention_multiplier": 0.0625,
    },
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": WINDOW},
    "qwen2_moe": {**MOE, "shared_expert_intermediate_size": 64, **SLIDE_QWEN, "max_window_layers": 4},
    "qwen3_moe": {**MOE, "use_sliding_window": True, "sliding_window": WINDOW},
    "olmo": {},
    "olmo3": {"sliding_window": WINDOW, "layer_types": ALTERNATE},
    "cohere": {"logit_scale": 0.5},
    "cohere2": {"sliding_window": WINDOW, "layer_types": ALTERNATE, "logit_scale": 0.5},
    "stablelm": {},
    "starcoder2": {"sliding_window": WINDOW},
    "glm": {},
    "glm4": {},
    "smollm3": {"use_sliding_window": True, "sliding_window": WINDOW, "no_rope_layer_interval": 2},
    "phi": {},
    "exaone4": {"sliding_window": WINDOW, "sliding_window_pattern": 2},
    "granitemoe": {
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "embedding_multiplier": 12.0,
        "logits_scaling": 8.0,
        "residual_multiplier": 0.22,
        "attention_multiplier": 0.0625,
    },
    "ministral": {"sliding_window": WINDOW, "layer_types": ALTERNATE, "rope_parameters": ROPE},
    "helium": {},
    "apertus": {},
    "arcee": {},
    "seed_oss": {},
    "ernie4_5": {},
    "hunyuan_v1_dense": {"rope_parameters": ROPE},
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny tensors: extra threads only add overhead, and stall badly on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_supported_family_has_an_exactness_config():
    assert sorted(CONFIGS) == sorted(SUPPORTED_FAMILIES)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    """(directory, unsplit reference model) for one family's tiny random checkpoint."""
    model_type = request.param
    config = AutoConfig.for_model(model_type, **{**BASE, **CONFIGS[model_type]})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = tmp_path_factory.mktemp(model_type)
    model.save_pretrained(path, safe_serialization=True)
    reference = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=attention_implementation(config)
    ).eval()
    reference.generation_config.eos_token_id = None  # random weights: never stop early
    return path, reference


def _left_padded(pad: list[int], length: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, BASE["vocab_size"], (len(pad), length), generator=gen)
    pad_lengths = torch.tensor(pad)
    mask = (torch.arange(length)[None] >= pad_lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, BASE["pad_token_id"])
    return ids, pad_lengths, mask


@pytest.mark.parametrize("p,q", [(1, 1), (0, 2)])
def test_split_logits_equal_unsplit_with_left_padding(checkpoint, p, q):
    path, reference = checkpoint
    ids, pad, mask = _left_padded([0, 3, 7], 20, seed=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask, position_ids=positions).logits
        got = load_split(str(path), p, q)(ids, pad)
    real = mask.bool()
    assert (got - expected)[real].abs().max().item() <= 1e-4


def test_greedy_decoding_through_three_caches_matches_unsplit_generate(checkpoint):
    path, reference = checkpoint
    ids, pad, mask = _left_padded([0, 4], 10, seed=2)
    steps = 10  # prompt + steps > WINDOW + a few: decoding crosses the sliding window
    with torch.no_grad():
        expected = reference.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=BASE["pad_token_id"],
            return_dict_in_generate=True,
            output_logits=True,
        )
        parts = load_split(str(path), 1, 1)
        caches = parts.new_caches()
        logits = parts(ids, pad, caches)
        tokens = []
        for step in range(steps):
            assert (logits[:, -1] - expected.logits[step]).abs().max().item() <= 1e-4
            tokens.append(logits[:, -1].argmax(-1, keepdim=True))
            logits = parts(tokens[-1], pad, caches)
    assert torch.equal(torch.cat(tokens, 1), expected.sequences[:, ids.shape[1] :])
    assert all(cache.length == ids.shape[1] + steps for cache in caches)


def test_sliding_window_mask_drops_keys_a_window_or_more_behind():
    _, mask = positions_and_mask(
        torch.tensor([0, 2]), q_len=1, offset=6, dtype=torch.float32, sliding_window=3
    )
    allowed = mask[:, 0, 0] == 0
    # query at index 6 sees keys 4, 5, 6 only; row 1's pad (keys 0-1) is out of the window anyway
    assert allowed.tolist() == [[False] * 4 + [True] * 3, [False] * 4 + [True] * 3]


def test_in_memory_model_of_another_family_is_refused_naming_the_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(UnsupportedModelError) as info:
        split(model, 1, 1)
    message = str(info.value)
    assert "gpt2" in message and "\n" not in message
    assert all(family in message for family in SUPPORTED_FAMILIES)


def test_bidirectional_gemma3_embedding_variant_is_refused_with_the_reason():
    config = AutoConfig.for_model("gemma3_text", **BASE, use_bidirectional_attention=True)
    with pytest.raises(UnsupportedModelError, match="bidirectional"):
        family_of(config)


def test_layer_kinds_other_than_full_or_sliding_are_refused():
    config = AutoConfig.for_model("qwen2", **BASE)
    config.layer_types = ["full_attention", "chunked_attention", "full_attention", "full_attention"]
    with pytest.raises(UnsupportedModelError, match="chunked_attention"):
        family_of(config)
