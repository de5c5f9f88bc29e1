"""A real server process SIGKILLed mid-training and mid-generation; the clients carry on to the same result."""

import contextlib
import logging
import shutil
import threading

import pytest
import torch

from fedsplit.bench.procs import free_port, server_process
from fedsplit.client.api import SplitModelForCausalLM
from fedsplit.client.checkpointing import ClientCheckpointer, ResilientTrainer
from fedsplit.client.core import SplitClient
from fedsplit.client.remote import RemoteTransport
from fedsplit.model.loading import model_fingerprint
from fedsplit.model.lora import LoraSettings, add_lora, lora_state_dict
from fedsplit.model.split import load_part
from fedsplit.privacy import parse_defense
from fedsplit.server.config import ServerConfig
from fedsplit.server.runner import build_servicer, start_background
from fedsplit.wire.protocol import SessionConfig

pytestmark = pytest.mark.e2e

SPEC, LORA, K, STEPS, KILL_AT = "tiny-llama", LoraSettings(rank=4, alpha=8.0), 2, 8, 5


def batches():
    """The same stream of batches every time (the data position is the step)."""
    step = 0
    while True:
        gen = torch.Generator().manual_seed(100 + step)
        ids = torch.randint(10, 250, (2, 10), generator=gen)
        pad = torch.tensor([0, 3])
        labels = ids.masked_fill(torch.arange(10)[None] <= (pad[:, None] + 2), -100)
        yield {"input_ids": ids, "labels": labels, "pad_lengths": pad}
        step += 1


def trainer(address: str, directory) -> ResilientTrainer:
    torch.manual_seed(0)
    head, tail = load_part(SPEC, "head", 1, 1), load_part(SPEC, "tail", 1, 1)
    add_lora(head, LORA, seed=3)
    add_lora(tail, LORA, seed=3)
    transport = RemoteTransport(
        address, wire_dtype="fp32", fingerprint=model_fingerprint(SPEC), retries=1, backoff=0.2
    )
    defense = parse_defense("gaussian:0.01", hidden_size=64)  # noise draws must line up after a resume too
    client = SplitClient(head, tail, transport, (1, 3), defense=defense)
    config = SessionConfig(
        span=(1, 3),
        mode="train",
        lora=LORA,
        seed=3,
        lr=1e-2,
        max_length=16,
        max_batch=2,
        run_id="week-long-job",
    )
    return ResilientTrainer(
        client, config, batches, ClientCheckpointer(directory, K), lr=1e-2, reconnect_timeout=240
    )


def adapters(t: ResilientTrainer) -> dict[str, torch.Tensor]:
    body = t.client.train_session.adapter_state()[1]
    return {
        **{f"head.{k}": v for k, v in lora_state_dict(t.client.head).items()},
        **{f"tail.{k}": v for k, v in lora_state_dict(t.client.tail).items()},
        **{f"body.{k}": v for k, v in body.items()},
    }


def identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_during_training_resumes_to_the_adapters_of_an_uninterrupted_run(tmp_path):
    port = free_port()
    serve = ("--checkpoint-dir", str(tmp_path / "server"), "--checkpoint-every", str(K))
    with contextlib.ExitStack() as servers:
        address, proc = servers.enter_context(server_process(SPEC, *serve, port=port))
        t = trainer(address, tmp_path / "client")
        t.start()
        killed = threading.Event()

        def on_step(step, _):
            if step == KILL_AT and not killed.is_set():
                killed.set()
                proc.kill()  # SIGKILL: no shutdown checkpoint, nothing flushed
                proc.wait()
                shutil.copytree(tmp_path / "server", tmp_path / "snap-server")
                shutil.copytree(tmp_path / "client", tmp_path / "snap-client")
                threading.Thread(
                    target=lambda: servers.enter_context(server_process(SPEC, *serve, port=port)), daemon=True
                ).start()

        t.run(STEPS, on_step)
        assert killed.is_set() and t.recoveries == 1 and t.step == STEPS
        interrupted = adapters(t)

    # the same checkpoints, resumed on a server that is never interrupted
    config = ServerConfig(
        model=SPEC, port=0, checkpoint_dir=str(tmp_path / "snap-server"), checkpoint_every=K
    )
    with start_background(build_servicer(config)) as srv:
        ref = trainer(srv.address, tmp_path / "snap-client")
        assert ref.start(resume=True) == KILL_AT - KILL_AT % K  # the last common step
        ref.run(STEPS)
        assert identical(interrupted, adapters(ref))

    # and a run that never saw a failure at all (a server process of its own: an in-process server
    # would draw from this process's RNG when it creates the adapter, shifting the client's noise)
    with server_process(SPEC) as (address, _):
        fresh = trainer(address, tmp_path / "fresh")
        fresh.start()
        fresh.run(STEPS)
        assert identical(interrupted, adapters(fresh))


def test_server_restart_during_generation_gives_the_uninterrupted_output(tmp_path, caplog):
    port = free_port()
    ids = torch.randint(10, 250, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    with contextlib.ExitStack() as servers:
        address, proc = servers.enter_context(server_process(SPEC, port=port))
        lm = SplitModelForCausalLM.from_pretrained(
            SPEC,
            server=address,
            head_layers=1,
            tail_layers=1,
            wire_dtype="fp16",
            defense=parse_defense("gaussian:0.01"),
        )
        torch.manual_seed(5)
        expected = lm.generate(ids, mask, max_new_tokens=16, eos_token_id=[])
        seen = []

        def on_token(token):
            seen.append(token)
            if len(seen) == 6:
                proc.kill()
                proc.wait()
                threading.Thread(
                    target=lambda: servers.enter_context(server_process(SPEC, port=port)), daemon=True
                ).start()

        torch.manual_seed(5)
        with caplog.at_level(logging.INFO, logger="fedsplit.client.resilience"):
            got = lm.generate(ids, mask, max_new_tokens=16, eos_token_id=[], on_token=on_token)
        assert torch.equal(got, expected)
        assert len(seen) == 16  # every token reported once, none repeated after the replay
        assert any("rebuilt" in r.message for r in caplog.records)
