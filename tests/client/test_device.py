"""The client computes where its segments are: any device, any dtype; data enters on the CPU."""

import math

import pytest
import torch

from fedsplit.client.api import SplitModelForCausalLM
from fedsplit.client.checkpointing import ClientCheckpointer
from fedsplit.client.config import TrainConfig
from fedsplit.client.core import LocalTransport
from fedsplit.client.train import build_client
from fedsplit.model.loading import load_model
from fedsplit.model.lora import LoraSettings
from fedsplit.wire.protocol import SessionConfig

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
LORA = LoraSettings(rank=4, alpha=8.0)


def batch(seed: int = 0) -> dict:
    """Three left-padded rows with labels on their last tokens, as the task layer gives them (CPU)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 250, (3, 10), generator=gen)
    pad = torch.tensor([0, 2, 5])
    labels = ids.masked_fill(torch.arange(10)[None] <= (pad[:, None] + 3), -100)
    return {"input_ids": ids, "labels": labels, "pad_lengths": pad}


def local_config(**overrides) -> TrainConfig:
    values = dict(model="tiny-llama", head_layers=1, tail_layers=1, rank=4, alpha=8.0)
    return TrainConfig(**values | overrides)


def trained_client(cfg: TrainConfig, steps: int = 2):
    client = build_client(cfg)
    client.start_training(
        SessionConfig(span=client.span, mode="train", lora=cfg.lora, lr=1e-2, seed=cfg.seed), lr=1e-2
    )
    return client, [client.train_step(batch(step)).loss for step in range(steps)]


def base_dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for n, p in module.named_parameters() if "lora_" not in n}


def test_a_bf16_train_step_through_the_local_transport_gives_a_finite_loss():
    client, losses = trained_client(local_config(dtype="bf16"))
    assert isinstance(client.transport, LocalTransport)
    for segment in (client.head, client.tail, client.transport.body):
        assert base_dtypes(segment) == {torch.bfloat16}
    assert all(math.isfinite(loss) for loss in losses)
    lora = [p for n, p in client.head.named_parameters() if "lora_B" in n]
    assert lora and all(p.dtype == torch.float32 and p.abs().sum() > 0 for p in lora)  # trained, in fp32


def test_the_default_placement_stays_cpu_fp32_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    client = build_client(local_config(), lora=False)
    assert client.device == torch.device("cpu")
    assert base_dtypes(client.head) == base_dtypes(client.transport.body) == {torch.float32}


def test_asking_for_cuda_without_a_gpu_is_refused_before_loading(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no GPU"):
        build_client(local_config(device="cuda", model="no-such-model-xyz"))


def test_from_pretrained_places_head_tail_and_a_local_body_in_the_dtype_asked_for():
    lm = SplitModelForCausalLM.from_pretrained("tiny-llama", head_layers=1, tail_layers=1, dtype="bf16")
    assert lm.device == torch.device("cpu")
    for segment in (lm.client.head, lm.client.tail, lm.client.transport.body):
        assert base_dtypes(segment) == {torch.bfloat16}
    ids = torch.randint(10, 250, (2, 6))
    out = lm.generate(ids, max_new_tokens=3)
    assert out.shape == (2, 9) and out.dtype == torch.long and torch.equal(out[:, :6], ids)


def test_a_checkpoint_is_written_from_the_cpu_and_restores_the_client(tmp_path):
    client, _ = trained_client(local_config(dtype="bf16"), steps=1)
    checkpointer = ClientCheckpointer(tmp_path, every=1)
    checkpointer.save(client, 1)
    saved = {n: p.detach().clone() for n, p in client.head.named_parameters() if p.requires_grad}
    client.train_step(batch(5))
    checkpointer.load(client, 1)
    for n, p in client.head.named_parameters():
        if p.requires_grad:
            assert p.device == client.device and torch.equal(p.detach(), saved[n]), n


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@needs_cuda
def test_split_logits_on_cuda_match_the_unsplit_model_on_cuda():
    lm = SplitModelForCausalLM.from_pretrained(
        "tiny-llama", head_layers=1, tail_layers=1, device="cuda", dtype="fp32"
    )
    unsplit = load_model("tiny-llama")[0].to("cuda").eval()
    ids = torch.randint(10, 250, (2, 9), device="cuda")
    pad = torch.zeros(2, dtype=torch.long, device="cuda")
    with torch.no_grad():
        expected = unsplit(ids).logits
        got = lm.client.logits(ids, pad)
    assert got.device.type == "cuda"
    assert (expected - got).abs().max().item() <= 1e-4


@pytest.mark.gpu
@needs_cuda
def test_generation_with_everything_on_cuda_through_the_local_transport():
    lm = SplitModelForCausalLM.from_pretrained("tiny-llama", head_layers=1, tail_layers=1, device="cuda")
    for segment in (lm.client.head, lm.client.tail, lm.client.transport.body):
        assert {p.device.type for p in segment.parameters()} == {"cuda"}
        assert base_dtypes(segment) == {torch.bfloat16}  # auto on CUDA
    ids = torch.randint(10, 250, (2, 6))
    on_cpu = lm.generate(ids, max_new_tokens=5, eos_token_id=[])
    on_gpu = lm.generate(ids.cuda(), max_new_tokens=5, eos_token_id=[])
    assert on_cpu.device.type == "cpu" and on_gpu.device.type == "cuda"  # tokens come back where ids were
    assert torch.equal(on_cpu, on_gpu.cpu()) and on_cpu.shape == (2, 11)


@pytest.mark.gpu
@needs_cuda
def test_a_bf16_train_step_on_cuda_gives_a_finite_loss_and_checkpoints_through_the_cpu(tmp_path):
    client, losses = trained_client(local_config(device="cuda", dtype="bf16"))
    assert client.device.type == "cuda" and all(math.isfinite(loss) for loss in losses)
    ClientCheckpointer(tmp_path, every=1).save(client, 2)
    ClientCheckpointer(tmp_path, every=1).load(client, 2)
    assert all(p.device.type == "cuda" for p in client.trainable_parameters())
