"""Generation sessions rebuild themselves on a restarted server (in-process server, stopped and started)."""

import torch

from fedsplit.client.core import SplitClient
from fedsplit.client.remote import RemoteTransport
from fedsplit.client.resilience import ReplayingTransport
from fedsplit.model.lora import LoraSettings
from fedsplit.model.split import load_part
from fedsplit.server.config import ServerConfig
from fedsplit.server.runner import build_servicer, start_background
from fedsplit.wire.protocol import SessionConfig

SPEC = "tiny-llama"


def serve(port=0):
    return start_background(build_servicer(ServerConfig(model=SPEC, port=port, shutdown_grace=0.2)))


def client(address, fingerprint, exact=True):
    head, tail = load_part(SPEC, "head", 1, 1), load_part(SPEC, "tail", 1, 1)
    transport = ReplayingTransport(
        RemoteTransport(address, wire_dtype="fp32", fingerprint=fingerprint, retries=0),
        reconnect_timeout=60,
        exact=exact,
    )
    return SplitClient(head, tail, transport, (1, 3))


def test_restart_mid_generation_replays_history_and_pushed_adapter(fingerprint):
    ids = torch.randint(10, 250, (1, 6), generator=torch.Generator().manual_seed(3))
    lora = LoraSettings(rank=2, alpha=4.0)
    srv = serve()
    port = srv.port
    try:
        c = client(srv.address, fingerprint)
        # a fine-tuned body adapter pushed into the generation session must survive the restart too
        donor = c.transport.open(SessionConfig(span=(1, 3), mode="train", lora=lora, seed=1, max_length=8))
        settings, state = donor.adapter_state()
        state = {k: v + 0.05 * torch.randn_like(v) for k, v in state.items()}
        donor.close()

        def generate(on_token=None):
            session = c.transport.open(SessionConfig(span=(1, 3), mode="generate", max_length=32))
            session.put_adapter(settings, state)
            session.forward(0, torch.randn(1, 2, 64), torch.zeros(1, dtype=torch.long), 0, use_cache=False)
            try:
                out = c.generate(ids, max_new_tokens=10, eos_token_id=[], session=session, on_token=on_token)
                return out, session, len(session.history)
            finally:
                session.close()

        expected, first, kept = generate()
        # prefill + 9 decode steps; the stateless forward is not kept
        assert first.reconnects == 0 and kept == 10
        tokens = []

        def on_token(token):
            nonlocal srv
            tokens.append(token)
            if len(tokens) == 5:  # the server goes away with a 10-token cache and an adapter
                srv.stop()
                srv = serve(port)

        got, second, _ = generate(on_token)
        assert second.reconnects == 1
        assert torch.equal(got, expected)
    finally:
        srv.stop()


def test_one_prefill_replay_gives_the_same_tokens(fingerprint):
    ids = torch.randint(10, 250, (2, 5), generator=torch.Generator().manual_seed(4))
    srv = serve()
    port = srv.port
    try:
        c = client(srv.address, fingerprint, exact=False)
        expected = c.generate(ids, max_new_tokens=8, eos_token_id=[])
        count = [0]

        def on_token(_):
            nonlocal srv
            count[0] += 1
            if count[0] == 4:
                srv.stop()
                srv = serve(port)

        assert torch.equal(c.generate(ids, max_new_tokens=8, eos_token_id=[], on_token=on_token), expected)
    finally:
        srv.stop()
