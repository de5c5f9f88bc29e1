"""A greedy client flooding the server barely slows another client (issue: per-client quotas).

The flooding client runs in its own process and sends decode steps as fast as the server answers,
ignoring every refusal. Its decode-token quota and the server's tarpit on refusals (a refused
request is answered only when the bucket would have let it pass, at most a second later) bound what
it costs the others. Measured: the other client's median decode latency with the flooder paused (SIGSTOP) and
running, in alternating windows; the flood may raise it by at most 1.5x. Bounded: a few hundred steps, every call has a
deadline, the flooding process is killed by the test.
"""

import signal
import statistics
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from fedsplit.client.remote import RemoteTransport
from fedsplit.server.auth import add_token
from fedsplit.server.config import ServerConfig
from fedsplit.server.runner import build_servicer, start_background
from fedsplit.wire.protocol import SessionConfig

pytestmark = pytest.mark.e2e

DEADLINE = 20
STEPS = 30
ROUNDS = 4
PACE = 0.025  # seconds between the measured client's steps: it stays within its own quota
GENERATE = SessionConfig(span=(1, 3), mode="generate", max_length=STEPS + 8, max_batch=4)

FLOODER = textwrap.dedent(
    """
    import sys, time, torch
    from fedsplit.client.remote import RemoteError, RemoteTransport
    from fedsplit.wire.protocol import SessionConfig
    address, token, fingerprint, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    t = RemoteTransport(address, token=token, wire_dtype="fp32", fingerprint=fingerprint, retries=0, timeout=20)
    cfg = SessionConfig(span=(1, 3), mode="generate", max_length=4096, max_batch=4)
    session = t.open(cfg)
    session.forward(1, torch.randn(4, 3, 64), torch.zeros(4, dtype=torch.long))
    print("flooding", flush=True)
    end, offset, served, refused = time.monotonic() + seconds, 3, 0, 0
    while time.monotonic() < end and offset < 4000:
        try:
            session.forward(offset, torch.randn(4, 1, 64), torch.zeros(4, dtype=torch.long), offset)
            offset, served = offset + 1, served + 1
        except RemoteError:
            refused += 1
    print("served", served, "refused", refused, flush=True)
    """
)


def victim_p50(session) -> float:
    """Median seconds per decode step over STEPS steps after a fresh prefill."""
    session.forward(1, torch.randn(1, 3, 64), torch.zeros(1, dtype=torch.long))
    times = []
    for i in range(STEPS):
        time.sleep(PACE)  # the client's own head, tail and sampling between two steps
        started = time.perf_counter()
        session.forward(2 + i, torch.randn(1, 1, 64), torch.zeros(1, dtype=torch.long), 3 + i)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def test_a_flooding_client_raises_another_clients_p50_decode_latency_by_at_most_1_5x(tmp_path, fingerprint):
    tokens = tmp_path / "tokens"
    token = {name: add_token(tokens, name) for name in ("greedy", "victim")}
    config = ServerConfig(
        model="tiny-llama",
        port=0,
        shutdown_grace=0.2,
        client_tokens_per_s=60,  # rows of decode steps: 15 steps/s of the flooder's batch of 4
        client_max_sessions=2,
    )
    servicer = build_servicer(config, tokens_file=str(tokens))
    with start_background(servicer) as srv:
        victim = RemoteTransport(
            srv.address,
            token=token["victim"],
            wire_dtype="fp32",
            fingerprint=fingerprint,
            retries=0,
            timeout=DEADLINE,
        )

        def measure() -> float:
            session = victim.open(GENERATE)
            try:
                return victim_p50(session)
            finally:
                session.close()

        measure()  # warm up the server's worker and the stream machinery
        flooder = subprocess.Popen(
            [sys.executable, "-c", FLOODER, srv.address, token["greedy"], fingerprint, "60"],
            stdout=subprocess.PIPE,
            text=True,
        )
        alone, flooded = [], []
        try:
            assert flooder.stdout.readline().strip() == "flooding"
            for _ in range(ROUNDS):  # alternate, so the machine's own drift falls on both sides alike
                flooder.send_signal(signal.SIGSTOP)
                alone.append(measure())
                flooder.send_signal(signal.SIGCONT)
                time.sleep(0.3)  # its bucket is spent again: from here on it is refused most of the time
                flooded.append(measure())
        finally:
            flooder.kill()
            flooder.wait(timeout=DEADLINE)
    alone_p50, flooded_p50 = statistics.median(alone), statistics.median(flooded)
    print(f"p50 alone {alone_p50 * 1e3:.2f} ms, flooded {flooded_p50 * 1e3:.2f} ms")
    assert flooded_p50 <= 1.5 * alone_p50, (alone, flooded)
