"""`fedsplit train --checkpoint-every K` then `--resume` ends where an uninterrupted run ends."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from fedsplit.client.config import TrainConfig
from fedsplit.client.train import run_training
from fedsplit.model.store import checkpoint_steps


def cfg(out: Path, steps: int, **kw) -> TrainConfig:
    return TrainConfig(
        model="tiny-llama",
        head_layers=1,
        tail_layers=1,
        task="sentiment",
        steps=steps,
        batch_size=2,
        lr=1e-2,
        max_length=48,
        max_examples=40,
        eval_examples=2,
        noise=0.01,
        wire_dtype="fp32",
        out=str(out),
        checkpoint_every=2,
        **kw,
    )


def adapters(out: Path) -> dict[str, torch.Tensor]:
    return {
        f"{part}.{k}": v
        for part in ("head", "body", "tail")
        for k, v in load_file(str(out / part / "adapter_model.safetensors")).items()
    }


def test_resumed_local_run_equals_an_uninterrupted_one(tmp_path):
    run_training(cfg(tmp_path / "a", steps=4), progress=False)  # "crashes" after step 4
    assert checkpoint_steps(tmp_path / "a" / "checkpoints") == [0, 2, 4]
    summary = run_training(cfg(tmp_path / "a", steps=6, resume=True), progress=False)
    assert [h["step"] for h in summary["history"]] == [5, 6]
    run_training(cfg(tmp_path / "b", steps=6), progress=False)
    resumed, straight = adapters(tmp_path / "a"), adapters(tmp_path / "b")
    assert resumed.keys() == straight.keys() and resumed
    assert all(torch.equal(resumed[k], straight[k]) for k in resumed)
