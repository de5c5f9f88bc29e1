"""A client process that dies mid-work: its sessions, pending graphs and caches are freed after the TTL, and
another client working at the same time never notices."""

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from faultkit import wait_until

from fedsplit.client.remote import RemoteTransport
from fedsplit.model.lora import LoraSettings
from fedsplit.server.config import ServerConfig
from fedsplit.server.runner import build_servicer, start_background
from fedsplit.wire.protocol import SessionConfig

pytestmark = pytest.mark.e2e

TTL = 1.5

DOOMED = textwrap.dedent("""
    import sys, time, torch
    from fedsplit.client.remote import RemoteTransport
    from fedsplit.model.lora import LoraSettings
    from fedsplit.server.session import SessionConfig
    t = RemoteTransport(sys.argv[1], wire_dtype="fp32", fingerprint=sys.argv[2], retries=0)
    gen = t.open(SessionConfig(span=(1, 3), mode="generate", max_length=64))
    gen.forward(0, torch.randn(1, 32, 64), torch.zeros(1, dtype=torch.long), 0)          # a KV cache
    train = t.open(SessionConfig(span=(1, 3), mode="train", lora=LoraSettings(rank=4), max_length=32))
    train.forward(1, torch.randn(1, 16, 64), torch.zeros(1, dtype=torch.long), 0)        # a pending graph
    print("ready", flush=True)
    time.sleep(600)
""")


def test_vanished_clients_sessions_are_freed_after_the_ttl_and_others_are_unaffected(fingerprint):
    config = ServerConfig(model="tiny-llama", port=0, session_ttl=TTL)
    with start_background(build_servicer(config)) as srv:
        servicer = srv.servicer
        other = RemoteTransport(srv.address, wire_dtype="fp32", fingerprint=fingerprint, retries=0).open(
            SessionConfig(span=(1, 3), mode="train", lora=LoraSettings(rank=2), seed=1, max_length=8)
        )
        probe = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(0))
        zero = torch.zeros(1, dtype=torch.long)
        expected = other.forward(0, probe, zero)
        other.backward(0, torch.zeros_like(expected))
        stop, errors, rounds = threading.Event(), [], [0]

        def keep_working():  # the other client: forward + backward, over and over, same answer each time
            step = 1
            while not stop.is_set():
                try:
                    out = other.forward(step, probe, zero)
                    other.backward(step, torch.zeros_like(out))
                    if not torch.equal(out, expected):
                        errors.append("output changed")
                except Exception as exc:  # pragma: no cover - reported below
                    errors.append(repr(exc))
                step += 1
                rounds[0] += 1

        worker = threading.Thread(target=keep_working, daemon=True)
        worker.start()
        baseline = dict(servicer._reserved)
        proc = subprocess.Popen(
            [sys.executable, "-c", DOOMED, srv.address, fingerprint],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            assert proc.stdout.readline().strip() == b"ready"
            doomed = [s for s in servicer.sessions.values() if s.id != other.id]
            assert len(doomed) == 2
            assert any(s.cache is not None and s.cache.length == 32 for s in doomed)
            assert any(len(s.graphs) == 1 for s in doomed)
            assert servicer.memory_in_use() > sum(baseline.values())
            proc.kill()  # no Close, no goodbye
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        # the stream breaks at once; the sessions wait for the TTL, then the evictor frees them
        assert wait_until(lambda: set(servicer.sessions) == {other.id}, timeout=TTL * 8)
        assert servicer._reserved == baseline
        assert wait_until(lambda: len(servicer.pool.settings) == 1, timeout=10)  # only the other's adapter
        for session in doomed:
            assert session.cache is None and not session.graphs
        before = rounds[0]
        assert wait_until(lambda: rounds[0] > before + 3, timeout=30)
        stop.set()
        worker.join(timeout=30)
        assert not errors, errors[:3]
        other.close()
