"""Split training is centralized training, computed in pieces."""

import torch
from peft import inject_adapter_in_model

from fedsplit.client.core import LocalTransport, SplitClient, lm_loss
from fedsplit.model.lora import LoraSettings, add_lora, seed_lora
from fedsplit.model.split import load_part
from fedsplit.wire.protocol import SessionConfig

LORA = LoraSettings(rank=4, alpha=8.0)
SEED = 3


def batches(n):
    for step in range(n):
        gen = torch.Generator().manual_seed(42 + step % 2)  # two batches, alternating: learnable
        ids = torch.randint(10, 250, (3, 10), generator=gen)
        pad = torch.tensor([0, 2, 5])
        labels = ids.masked_fill(torch.arange(10)[None] <= (pad[:, None] + 3), -100)  # loss on the "answer"
        yield {"input_ids": ids, "labels": labels, "pad_lengths": pad}


def centralized_losses(model, steps, lr):
    model = inject_adapter_in_model(LORA.peft_config(), model)
    seed_lora(model, SEED)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for b in batches(steps):
        mask = (torch.arange(10)[None] >= b["pad_lengths"][:, None]).long()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        loss = lm_loss(model(b["input_ids"], attention_mask=mask, position_ids=pos).logits, b["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def split_losses(p, q, steps, lr):
    head, tail = load_part("tiny-llama", "head", p, q), load_part("tiny-llama", "tail", p, q)
    add_lora(head, LORA, seed=SEED)
    add_lora(tail, LORA, seed=SEED)
    span = (p, 4 - q)
    client = SplitClient(head, tail, LocalTransport(load_part("tiny-llama", "body", span=span)), span)
    client.start_training(SessionConfig(span=span, mode="train", lora=LORA, lr=lr, seed=SEED), lr=lr)
    return [client.train_step(b).loss for b in batches(steps)]


def test_centralized_and_noise_free_split_loss_curves_coincide(tiny):
    model, _ = tiny
    central = centralized_losses(model, steps=8, lr=3e-2)
    split = split_losses(1, 1, steps=8, lr=3e-2)
    assert central[-1] < central[0] - 0.05  # training really moves the loss
    assert abs(central[0] - split[0]) <= 1e-6 * abs(central[0])  # same init, same data: the same first loss
    # Later steps agree to float noise, which Adam's g / (|g| + eps) amplifies on near-zero gradients.
    for c, s in zip(central, split):
        assert abs(c - s) <= 1e-3 * abs(c)


def test_gaussian_noise_changes_training_but_not_the_clean_backward(tiny):
    from fedsplit.privacy import parse_defense

    head, tail = load_part("tiny-llama", "head", 1, 1), load_part("tiny-llama", "tail", 1, 1)
    add_lora(head, LORA, seed=SEED)
    add_lora(tail, LORA, seed=SEED)
    torch.manual_seed(0)
    client = SplitClient(
        head,
        tail,
        LocalTransport(load_part("tiny-llama", "body", 1, 1)),
        (1, 3),
        defense=parse_defense("gaussian:0.5"),
    )
    client.start_training(SessionConfig(span=(1, 3), mode="train", lora=LORA, seed=SEED))
    noisy = client.train_step(next(batches(1))).loss
    clean = split_losses(1, 1, steps=1, lr=2e-4)[0]
    assert abs(noisy - clean) > 1e-4
