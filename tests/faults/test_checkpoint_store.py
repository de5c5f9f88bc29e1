"""Checkpoints are written atomically: a kill -9 at any moment leaves only complete, verifiable ones."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from fedsplit.model.store import (
    CheckpointError,
    checkpoint_steps,
    load_optimizer_state,
    optimizer_state,
    prune,
    read_checkpoint,
    step_dir,
    valid_steps,
    write_checkpoint,
)


def test_checkpoint_round_trips_tensors_and_meta(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "scalar": torch.tensor(2.5)}
    write_checkpoint(tmp_path, 7, tensors, {"note": "x", "nested": {"k": [1, 2]}})
    loaded, meta = read_checkpoint(tmp_path, 7)
    assert meta == {"note": "x", "nested": {"k": [1, 2]}}
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert checkpoint_steps(tmp_path) == [7]


def test_damaged_checkpoint_is_refused_and_skipped(tmp_path):
    for step in (2, 4):
        write_checkpoint(tmp_path, step, {"w": torch.full((4,), float(step))}, {})
    blob = step_dir(tmp_path, 4) / "tensors.safetensors"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        read_checkpoint(tmp_path, 4)
    assert valid_steps(tmp_path) == [2]


def test_leftovers_of_interrupted_writes_are_ignored_and_pruned(tmp_path):
    write_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, {})
    (tmp_path / ".tmp-step-00000002-dead").mkdir()
    (tmp_path / "step-00000003").mkdir()  # a directory without its files
    assert checkpoint_steps(tmp_path) == [1]
    prune(tmp_path, keep=3)
    assert not (tmp_path / ".tmp-step-00000002-dead").exists()


def test_prune_keeps_newest_and_drops_an_abandoned_timeline(tmp_path):
    for step in range(1, 7):
        write_checkpoint(tmp_path, step, {"w": torch.zeros(1)}, {})
    prune(tmp_path, keep=3, above=4)
    assert checkpoint_steps(tmp_path) == [2, 3, 4]


def test_rewriting_a_step_replaces_it(tmp_path):
    write_checkpoint(tmp_path, 3, {"w": torch.zeros(2)}, {"v": 1})
    write_checkpoint(tmp_path, 3, {"w": torch.ones(2)}, {"v": 2})
    tensors, meta = read_checkpoint(tmp_path, 3)
    assert meta == {"v": 2} and torch.equal(tensors["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000003"]


def test_adamw_state_round_trips_exactly(tmp_path):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        sum((p**2).sum() for p in params).backward()
        opt.step()
        opt.zero_grad()
    tensors, meta = optimizer_state(opt, ["a", "b"])
    write_checkpoint(tmp_path, 3, tensors, {"opt": meta})
    loaded, saved = read_checkpoint(tmp_path, 3)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin_opt = torch.optim.AdamW(twins, lr=5.0)
    load_optimizer_state(twin_opt, ["a", "b"], loaded, saved["opt"])
    for group, o in ((params, opt), (twins, twin_opt)):  # one more step on each: same state, same result
        sum((x**2).sum() for x in group).backward()
        o.step()
    assert twin_opt.param_groups[0]["lr"] == 1e-2
    assert all(torch.equal(a, b) for a, b in zip(params, twins))


WRITER = textwrap.dedent("""
    import sys, torch
    from fedsplit.model.store import write_checkpoint, prune
    root = sys.argv[1]
    print("ready", flush=True)
    step = 0
    while True:
        step += 1
        w = torch.full((256, 1024), float(step))  # 1 MiB: a write takes a while
        write_checkpoint(root, step, {"w": w, "v": torch.tensor(step)}, {"step": step})
        prune(root, keep=3)
""")


@pytest.mark.e2e
def test_kill_9_during_writes_leaves_only_complete_checkpoints(tmp_path):
    """SIGKILL a process that writes checkpoints in a loop, at several moments; every survivor verifies."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for attempt, delay in enumerate((0.3, 0.77, 1.31)):
        root = tmp_path / f"run{attempt}"
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, env=env)
        try:
            assert proc.stdout.readline().strip() == b"ready"
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        steps = checkpoint_steps(root)
        assert steps, "the writer produced no checkpoint before the kill"
        for step in steps:
            tensors, meta = read_checkpoint(root, step)  # raises if torn
            assert meta["step"] == step and int(tensors["v"]) == step
            assert torch.equal(tensors["w"], torch.full((256, 1024), float(step)))
