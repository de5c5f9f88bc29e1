import copy

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict, inject_adapter_in_model

from fedsplit.model.lora import (
    LoraSettings,
    add_lora,
    export_adapter,
    load_lora_state_dict,
    lora_parameters,
    save_adapter,
)
from fedsplit.model.split import split

SETTINGS = LoraSettings(rank=4, alpha=8.0)


def randomize_lora(module, seed=0):
    """LoRA B starts at zero; give it values so adapters change the output and A gets gradients."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def segment_state(full_state, segment):
    held = {f"layers.{i}." for i in segment.layer_indices}
    return {k: v for k, v in full_state.items() if any(k.startswith(h) for h in held)}


def split_with_lora(model, p, q, centralized):
    """Split a copy of the base model, add LoRA per segment, copy the centralized adapter in."""
    parts = split(copy.deepcopy(model), p, q)
    state = {k.removeprefix("model."): v for k, v in get_peft_model_state_dict(centralized).items()}
    for segment in (parts.head, parts.body, parts.tail):
        add_lora(segment, SETTINGS)
        load_lora_state_dict(segment, segment_state(state, segment))
    return parts


@pytest.fixture
def centralized(tiny):
    model, _ = tiny
    base = copy.deepcopy(model)
    lora_model = inject_adapter_in_model(SETTINGS.peft_config(), copy.deepcopy(model))
    randomize_lora(lora_model)
    return base, lora_model


def lm_loss(logits, labels):
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
    )


@pytest.mark.parametrize("p,q", [(1, 1), (2, 1), (0, 2)])
def test_split_lora_gradients_equal_centralized(centralized, padded_batch, p, q):
    base, lora_model = centralized
    ids, pad, mask, positions = padded_batch
    # The first real token has no real predecessor: mask it like the pads.
    labels = ids.masked_fill(torch.arange(ids.shape[1])[None] <= pad[:, None], -100)

    loss = lm_loss(lora_model(ids, attention_mask=mask, position_ids=positions).logits, labels)
    loss.backward()
    expected = {k.removeprefix("model."): p_.grad for k, p_ in lora_model.named_parameters() if "lora_" in k}

    parts = split_with_lora(base, p, q, lora_model)
    # Hand hidden states and their gradients across "the network" by hand.
    h_head = parts.head(ids, pad)
    sent = h_head.detach().requires_grad_()
    h_body = parts.body(sent, pad)
    received = h_body.detach().requires_grad_()
    split_loss = lm_loss(parts.tail(received, pad), labels)
    split_loss.backward()
    h_body.backward(received.grad)
    if h_head.requires_grad:  # an embedding-only head has nothing to train
        h_head.backward(sent.grad)

    got = {}
    for segment in (parts.head, parts.body, parts.tail):
        got.update({k: p_.grad for k, p_ in segment.named_parameters() if "lora_" in k})
    assert set(got) == set(expected)
    assert torch.allclose(split_loss, loss, rtol=1e-6)
    for key, grad in expected.items():
        rel = (got[key] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert rel.item() <= 1e-5, key


def test_only_lora_weights_are_trainable(tiny):
    model, _ = tiny
    parts = split(model, 1, 1)
    for segment in (parts.head, parts.body, parts.tail):
        add_lora(segment, SETTINGS)
    trainable = [
        n for s in (parts.head, parts.body, parts.tail) for n, p in s.named_parameters() if p.requires_grad
    ]
    assert trainable and all("lora_" in n for n in trainable)
    # 4 target modules x 2 matrices x 4 layers
    assert len(trainable) == 4 * 2 * 4


def test_embedding_only_head_gets_no_adapter(tiny):
    model, _ = tiny
    parts = split(model, 0, 0)
    add_lora(parts.head, SETTINGS)
    assert lora_parameters(parts.head) == []


def test_exported_adapter_reproduces_split_logits_on_unsplit_model(centralized, padded_batch, tmp_path):
    base, lora_model = centralized
    ids, pad, mask, positions = padded_batch
    parts = split_with_lora(base, 2, 1, lora_model)
    for name, segment in (("head", parts.head), ("body", parts.body), ("tail", parts.tail)):
        save_adapter(segment, tmp_path / "adapters" / name, SETTINGS)
    out = export_adapter(tmp_path / "adapters", tmp_path / "merged")
    unsplit = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    with torch.no_grad():
        expected = parts(ids, pad)
        got = unsplit(ids, attention_mask=mask, position_ids=positions).logits
        plain = base(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert (got - expected)[real].abs().max().item() <= 1e-4
    assert (plain - expected)[real].abs().max().item() > 1e-3  # the adapter really changes the output


def test_repartition_keeps_logits_and_moves_lora(centralized, padded_batch):
    base, lora_model = centralized
    ids, pad, *_ = padded_batch
    parts = split_with_lora(base, 1, 1, lora_model)
    with torch.no_grad():
        before = parts(ids, pad)
        parts.repartition(3, 0)
        after = parts(ids, pad)
    assert parts.head.layer_indices == [0, 1, 2] and parts.body.layer_indices == [3]
    assert lora_parameters(parts.head)  # LoRA travelled with the blocks
    assert torch.equal(before, after)
