"""Device and dtype: resolving the user's words, loading parts in bf16, and bf16 split = bf16 unsplit."""

import zlib

import pytest
import torch

from fedsplit.model.device import resolve_device, resolve_dtype
from fedsplit.model.loading import load_model
from fedsplit.model.lora import LoraSettings, add_lora, lora_parameters
from fedsplit.model.split import load_part, load_split

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
LORA = LoraSettings(rank=4, alpha=8.0)
STEPS = 32


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ----------------------------------------------------------------------------- resolving names


def test_auto_device_is_the_cpu_without_cuda_and_its_dtype_is_fp32(no_cuda):
    device = resolve_device("auto")
    assert device == torch.device("cpu")
    assert resolve_dtype("auto", device) == torch.float32


def test_auto_dtype_on_cuda_is_bf16():
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda:1")) == torch.bfloat16


@pytest.mark.parametrize(
    "name,dtype",
    [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16), ("BF16", torch.bfloat16)],
)
def test_dtype_names_map_to_torch_dtypes_on_any_device(name, dtype):
    assert resolve_dtype(name, "cpu") == resolve_dtype(name, "cuda") == dtype
    assert resolve_dtype(dtype) == dtype


@pytest.mark.parametrize("name", ["int8", "half-ish", ""])
def test_unknown_dtype_is_one_clear_line(name):
    with pytest.raises(ValueError, match="fp32, bf16, fp16") as info:
        resolve_dtype(name)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "gpu0", ""])
def test_unknown_device_is_one_clear_line(name):
    with pytest.raises(ValueError, match="auto, cpu, cuda") as info:
        resolve_device(name)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_refused_saying_what_to_use(no_cuda, name):
    with pytest.raises(ValueError, match="no GPU.*'cpu'") as info:
        resolve_device(name)
    assert "\n" not in str(info.value)


def test_cpu_is_the_cpu():
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.gpu
@needs_cuda
def test_cuda_devices_resolve_up_to_the_gpu_count():
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="does not exist"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


# ----------------------------------------------------------------------------- loading in bf16


def test_load_part_defaults_to_fp32_on_the_cpu():
    head = load_part("tiny-llama", "head", 1, 1)
    assert {(p.dtype, p.device.type) for p in head.parameters()} == {(torch.float32, "cpu")}


def test_load_part_materialises_weights_in_the_dtype_asked_for_with_fp32_rotary_frequencies():
    for part in ("head", "body", "tail"):
        segment = load_part("tiny-llama", part, 1, 1, dtype="bf16")
        assert {p.dtype for p in segment.parameters()} == {torch.bfloat16}
        assert segment.rotary_emb.inv_freq.dtype == torch.float32  # cast per call, computed in fp32


def bf16_reference():
    model, _ = load_model("tiny-llama", dtype=torch.bfloat16)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return model


def prompt():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(10, 250, (3, 8), generator=gen)
    pad = torch.tensor([0, 3, 5])
    mask = (torch.arange(8)[None] >= pad[:, None]).long()
    return ids, pad, mask


def greedy_through_caches(parts, ids, pad, steps):
    caches = parts.new_caches()
    logits = parts(ids, pad, caches)
    tokens, step_logits = [], []
    for _ in range(steps):
        step_logits.append(logits[:, -1])
        tokens.append(logits[:, -1].argmax(-1, keepdim=True))
        logits = parts(tokens[-1], pad, caches)
    return torch.cat(tokens, 1), step_logits, caches


def logit_bound(reference_logits) -> float:
    """Four bf16 rounding steps (2^-8 relative each) at the largest logit.

    Split and unsplit run the same layers on the same shapes; only the mask (an additive one
    here, Hugging Face's own there) and the strided KV views differ. On CPU the logits come
    out bit-identical (measured max |diff| = 0.0 over 32 steps); the bound leaves room for
    backends whose attention kernel depends on the mask's form, yet a wrong position, mask
    or cache entry moves logits by a sizeable fraction of their scale.
    """
    scale = max(logits.float().abs().max().item() for logits in reference_logits)
    return 4 * 2**-8 * scale


@pytest.fixture(scope="module")
def bf16_generation():
    """The prompt and the unsplit bf16 model's greedy generation of it (built once for the module)."""
    model = bf16_reference()
    ids, pad, mask = prompt()
    with torch.no_grad():
        ref = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=STEPS,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
        )
    return ids, pad, ref


@pytest.mark.parametrize("p,q", [(1, 1), (0, 2), (2, 1)])
def test_bf16_split_decodes_the_same_greedy_tokens_as_bf16_unsplit(bf16_generation, p, q):
    ids, pad, ref = bf16_generation
    with torch.no_grad():
        parts = load_split("tiny-llama", p, q, dtype=torch.bfloat16)
        tokens, step_logits, caches = greedy_through_caches(parts, ids, pad, STEPS)
    assert step_logits[0].dtype == torch.bfloat16
    assert all(c.layers[i][0].dtype == torch.bfloat16 for c in caches for i in c.layers)
    assert torch.equal(tokens, ref.sequences[:, 8:])
    bound = logit_bound(ref.logits)
    for ours, theirs in zip(step_logits, ref.logits):
        assert (ours.float() - theirs.float()).abs().max().item() <= bound


# ----------------------------------------------------------------------------- LoRA on a bf16 base


def randomize_lora_b(module):
    """B starts at zero (so A gets no gradient); give it values keyed by the layer-global name."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if ".lora_B." in name:
                key = name[name.index("layers.") :]
                generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def lm_loss(logits, labels):
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
    )


def lora_grads(module):
    return {n[n.index("layers.") :]: p.grad for n, p in module.named_parameters() if "lora_" in n}


def test_lora_on_a_bf16_segment_keeps_fp32_adapters_on_the_base_device_and_trains():
    body = load_part("tiny-llama", "body", 1, 1, dtype=torch.bfloat16)
    add_lora(body, LORA, seed=3)
    randomize_lora_b(body)
    adapters = lora_parameters(body)
    assert adapters and {(p.dtype, p.device.type) for p in adapters} == {(torch.float32, "cpu")}
    assert all(p.dtype == torch.bfloat16 for n, p in body.named_parameters() if "lora_" not in n)
    hidden = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    out = body(hidden.requires_grad_())
    assert out.dtype == torch.bfloat16  # hidden states keep the base dtype
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapters)
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in adapters)
    assert hidden.grad.dtype == torch.bfloat16 and torch.isfinite(hidden.grad).all()
    before = [p.detach().clone() for p in adapters]
    torch.optim.AdamW(adapters, lr=1e-4).step()
    # 1e-4 steps on weights of ~0.05 survive in fp32; in bf16 (8-bit mantissa) they would round away.
    assert all(not torch.equal(b, p) for b, p in zip(before, adapters))


@pytest.mark.parametrize("p,q", [(1, 1), (0, 2), (2, 1)])
def test_bf16_split_lora_gradients_equal_bf16_centralized(padded_batch, p, q):
    ids, pad, mask, positions = padded_batch
    labels = ids.masked_fill(torch.arange(ids.shape[1])[None] <= pad[:, None], -100)

    model, _ = load_model("tiny-llama", dtype=torch.bfloat16)
    add_lora(model, LORA, seed=3)  # the same adapter choice (fp32) as the segments
    randomize_lora_b(model)
    loss = lm_loss(model(ids, attention_mask=mask, position_ids=positions).logits, labels)
    loss.backward()
    expected = lora_grads(model)

    parts = load_split("tiny-llama", p, q, dtype=torch.bfloat16)
    for segment in (parts.head, parts.body, parts.tail):
        add_lora(segment, LORA, seed=3)
        randomize_lora_b(segment)
    h_head = parts.head(ids, pad)
    sent = h_head.detach().requires_grad_()
    h_body = parts.body(sent, pad)
    received = h_body.detach().requires_grad_()
    split_loss = lm_loss(parts.tail(received, pad), labels)
    split_loss.backward()
    h_body.backward(received.grad)
    if h_head.requires_grad:
        h_head.backward(sent.grad)
    got = {}
    for segment in (parts.head, parts.body, parts.tail):
        got.update(lora_grads(segment))

    assert h_body.dtype == torch.bfloat16
    assert set(got) == set(expected)
    # Measured on CPU: bit-identical (relative error 0.0), the same kernels in the same order.
    # Bound: 2^-7, two bf16 roundings, for backends that pick another attention kernel; a
    # gradient that misses a segment or a scale is off by O(1).
    assert abs(split_loss.item() - loss.item()) <= 2**-7 * abs(loss.item())
    for key, grad in expected.items():
        rel = (got[key] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert rel.item() <= 2**-7, key


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@needs_cuda
def test_bf16_split_on_cuda_decodes_like_unsplit_with_everything_on_the_gpu():
    model = bf16_reference().to("cuda")
    ids, pad, mask = (t.to("cuda") for t in prompt())
    with torch.no_grad():
        ref = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=STEPS,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
        )
        parts = load_split("tiny-llama", 1, 1, dtype="auto", device="cuda")
        assert {p.device.type for p in parts.parameters()} == {"cuda"}
        assert {p.dtype for p in parts.parameters()} == {torch.bfloat16}
        assert parts.body.rotary_emb.inv_freq.device.type == "cuda"
        tokens, step_logits, caches = greedy_through_caches(parts, ids, pad, STEPS)
    assert all(c.layers[i][0].device.type == "cuda" for c in caches for i in c.layers)
    bound = logit_bound(ref.logits)
    for ours, theirs in zip(step_logits, ref.logits):
        assert (ours.float() - theirs.float()).abs().max().item() <= bound
    assert torch.equal(tokens, ref.sequences[:, 8:])


@pytest.mark.gpu
@needs_cuda
def test_lora_on_a_cuda_segment_is_created_on_the_gpu():
    tail = load_part("tiny-llama", "tail", 1, 1, dtype="bf16", device="cuda")
    add_lora(tail, LORA, seed=3)
    adapters = lora_parameters(tail)
    assert {(p.device.type, p.dtype) for p in adapters} == {("cuda", torch.float32)}
    tail(torch.randn(2, 4, 64, device="cuda", dtype=torch.bfloat16)).float().mean().backward()
    assert all(p.grad is not None and p.grad.device.type == "cuda" for p in adapters)
