"""The client calls a defence's input- and output-side hooks: text-level replacement, trained
penalties that see the inputs, and the bypass that cancels on the client what it added."""

import torch

from fedsplit.client.core import LocalTransport, SplitClient
from fedsplit.model.lora import LoraSettings, add_lora
from fedsplit.model.split import load_part
from fedsplit.privacy import parse_defense
from fedsplit.wire.protocol import SessionConfig

LORA = LoraSettings(rank=4, alpha=8.0)


def client_for(spec: str | None, p: int = 1, q: int = 1) -> SplitClient:
    head, tail = load_part("tiny-llama", "head", p, q), load_part("tiny-llama", "tail", p, q)
    add_lora(head, LORA, seed=3)
    add_lora(tail, LORA, seed=3)
    span = (p, 4 - q)
    defense = parse_defense(spec, hidden_size=64, embedding=head.embed_tokens.weight.detach(), keep_ids=[0])
    return SplitClient(head, tail, LocalTransport(load_part("tiny-llama", "body", span=span)), span, defense)


def batch() -> dict:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(10, 250, (2, 12), generator=gen)
    pad = torch.tensor([0, 3])
    ids[1, :3] = 0
    labels = ids.masked_fill(torch.arange(12)[None] <= pad[:, None] + 4, -100)
    return {"input_ids": ids, "labels": labels, "pad_lengths": pad}


def test_bypass_cancels_the_noise_the_client_added_when_the_body_is_empty():
    # p + q = N: the body returns what it got, so with the bypass the tail reads the clean head output.
    b = batch()
    clean = client_for(None, 2, 2).logits(b["input_ids"], b["pad_lengths"])
    torch.manual_seed(0)
    noisy = client_for("gaussian:5.0", 2, 2).logits(b["input_ids"], b["pad_lengths"])
    torch.manual_seed(0)
    cancelled = client_for("gaussian:5.0+bypass", 2, 2).logits(b["input_ids"], b["pad_lengths"])
    assert not torch.allclose(noisy, clean, atol=1e-2)
    assert torch.allclose(cancelled, clean, atol=1e-4)


def test_text_dx_with_a_huge_epsilon_reads_the_ids_unchanged_and_a_tiny_one_changes_them():
    b = batch()
    clean = client_for(None).logits(b["input_ids"], b["pad_lengths"])
    kept = client_for("textdx:1e9,k=4").logits(b["input_ids"], b["pad_lengths"])
    replaced = client_for("textdx:1e-6,k=4").logits(b["input_ids"], b["pad_lengths"])
    assert torch.allclose(kept, clean, atol=1e-5)
    assert not torch.allclose(replaced, clean, atol=1e-2)


def test_trained_defences_see_the_inputs_and_their_penalties_reach_the_head():
    for spec in ("nopeek:1.0", "adv:1.0"):
        client = client_for(spec)
        client.start_training(SessionConfig(span=client.span, mode="train", lora=LORA, seed=3))
        client.loss_and_backward(batch())
        extra = client.defense.extra_loss()
        assert extra is not None and float(extra.detach()) != 0.0, spec
        head_grads = [p.grad for n, p in client.head.named_parameters() if "lora_" in n]
        assert head_grads and all(g is not None for g in head_grads), spec
    inverter = [p for n, p in client.defense.named_parameters() if p.requires_grad]
    assert inverter and any(p.grad is not None and p.grad.abs().sum() > 0 for p in inverter)


def test_text_dx_with_bypass_keeps_the_true_text_on_the_clients_path():
    # An empty body (p + q = N): with the bypass the tail reads the head's output on the true ids,
    # while the server got the states of the perturbed ids.
    b = batch()
    clean = client_for(None, 2, 2).logits(b["input_ids"], b["pad_lengths"])
    perturbed = client_for("textdx:1e-6,k=4", 2, 2).logits(b["input_ids"], b["pad_lengths"])
    client = client_for("textdx:1e-6,k=4+bypass", 2, 2)
    sent = []
    client.taps.append(lambda states, pad: sent.append(states))
    both = client.logits(b["input_ids"], b["pad_lengths"])
    assert not torch.allclose(perturbed, clean, atol=1e-2)
    assert torch.allclose(both, clean, atol=1e-4)
    with torch.no_grad():
        true_states = client.head(b["input_ids"], b["pad_lengths"])
    real = torch.arange(12)[None] >= b["pad_lengths"][:, None]
    assert not torch.allclose(sent[0][real], true_states[real], atol=1e-2)  # the server saw other text
