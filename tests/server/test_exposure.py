"""Safe to expose: no public bind without TLS and client auth, mutual TLS, token revocation on a
running server, per-client quotas and the audit log. Every server here binds port 0 and is stopped
by its test; every call has a deadline."""

import datetime
import json
import logging
import time

import grpc
import pytest
import torch

from fedsplit.client.remote import RemoteError, RemoteTransport
from fedsplit.model.lora import LoraSettings
from fedsplit.server.auth import (
    Authenticator,
    AuthError,
    TokenStore,
    add_token,
    hash_token,
    revoke_token,
)
from fedsplit.server.config import ServerConfig
from fedsplit.server.quotas import ClientQuotas, TokenBucket
from fedsplit.server.runner import build_servicer, exposure_problem, is_loopback, start_background
from fedsplit.wire import fedsplit_pb2 as pb
from fedsplit.wire import fedsplit_pb2_grpc as pb_grpc
from fedsplit.wire.protocol import SessionConfig

DEADLINE = 20  # seconds; no call of these tests may hang
GENERATE = SessionConfig(span=(1, 3), mode="generate", max_length=16, max_batch=1)
TRAIN = SessionConfig(span=(1, 3), mode="train", lora=LoraSettings(rank=2, alpha=4.0), max_length=8)


def config(**kw) -> ServerConfig:
    return ServerConfig(model="tiny-llama", port=0, shutdown_grace=0.2, **kw)


def transport(srv, fingerprint, token=None) -> RemoteTransport:
    return RemoteTransport(
        srv.address, token=token, wire_dtype="fp32", fingerprint=fingerprint, retries=0, timeout=DEADLINE
    )


def prefill(session, rows=1, length=3):
    return session.forward(1, torch.randn(rows, length, 64), torch.zeros(rows, dtype=torch.long))


def decode(session, step, offset=3):
    return session.forward(step, torch.randn(1, 1, 64), torch.zeros(1, dtype=torch.long), offset)


def refused(call, code) -> str:
    """The message of the RemoteError ``call()`` raises, which must carry ``code``."""
    with pytest.raises(RemoteError) as exc:
        call()
    assert exc.value.code == code, exc.value
    return exc.value.message


def wait_for(predicate, seconds=5.0) -> bool:
    """Whether ``predicate()`` becomes true within ``seconds`` (the server finishes a stream on its thread)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# ------------------------------------------------------------------ refusing insecure exposure


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_loopback_hosts(host):
    assert is_loopback(host)
    assert exposure_problem(ServerConfig(host=host), tls=False, client_auth=False) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "10.1.2.3", "example.org", ""])
def test_beyond_loopback_needs_tls_and_client_authentication(host):
    assert not is_loopback(host)
    cfg = ServerConfig(host=host)
    both = exposure_problem(cfg, tls=False, client_auth=False)
    assert "TLS (--tls-cert and --tls-key) and client authentication (--tokens or --tls-client-ca)" in both
    assert "--insecure" in both and "\n" not in both
    assert "TLS" not in exposure_problem(cfg, tls=True, client_auth=False)
    assert "client authentication" not in exposure_problem(cfg, tls=False, client_auth=True)
    assert exposure_problem(cfg, tls=True, client_auth=True) is None


def test_server_on_a_public_address_without_tls_refuses_to_start():
    servicer = build_servicer(config(host="0.0.0.0"))
    try:
        with pytest.raises(
            ValueError, match=r"^refusing to serve on 0\.0\.0\.0, beyond loopback, without TLS"
        ):
            start_background(servicer)
    finally:
        servicer.executor.shutdown(wait=True)


def test_insecure_server_on_a_public_address_starts_with_a_warning(caplog):
    caplog.set_level(logging.WARNING, logger="fedsplit.server.runner")
    srv = start_background(build_servicer(config(host="0.0.0.0", insecure=True)))
    srv.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith("--insecure: serving on 0.0.0.0") and "without TLS" in w for w in warnings)


# ------------------------------------------------------------------ mutual TLS


def _pki(tmp_path):
    """A CA, a server certificate for localhost, client certificates for alice (by the CA) and for
    mallory (self-signed); PEM files in ``tmp_path``. Skips without the cryptography package."""
    pytest.importorskip("cryptography", reason="the cryptography package makes the test certificates")
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def issue(cn, issuer=None, ca=False, server=False):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (name, key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
        )
        if server:
            alt = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), False)
        if not ca:
            usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), False)
        cert = builder.sign(issuer_key, hashes.SHA256())
        for suffix, data in (
            ("crt", cert.public_bytes(serialization.Encoding.PEM)),
            (
                "key",
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
            ),
        ):
            (tmp_path / f"{cn}.{suffix}").write_bytes(data)
        return cert, key

    ca = issue("fedsplit-ca", ca=True)
    issue("localhost", ca, server=True)
    issue("alice", ca)
    issue("mallory")
    return {p.stem + "." + p.suffix[1:]: str(p) for p in tmp_path.iterdir()}


def _mtls_channel(address, pki, client):
    read = lambda name: open(pki[name], "rb").read()  # noqa: E731
    creds = grpc.ssl_channel_credentials(
        root_certificates=read("fedsplit-ca.crt"),
        private_key=read(f"{client}.key") if client else None,
        certificate_chain=read(f"{client}.crt") if client else None,
    )
    return grpc.secure_channel(address, creds)


def test_mutual_tls_names_the_client_by_its_certificate_and_refuses_others(tmp_path, fingerprint):
    pki = _pki(tmp_path)
    servicer = build_servicer(config(tls_client_ca=pki["fedsplit-ca.crt"]))
    with start_background(servicer, tls_cert=pki["localhost.crt"], tls_key=pki["localhost.key"]) as srv:
        address = srv.address
        # alice's certificate: Info answers and her session is hers (session ids end with the client id)
        channel = _mtls_channel(address, pki, "alice")
        info = pb_grpc.SplitServiceStub(channel).Info(pb.InfoRequest(), timeout=DEADLINE)
        assert info.model_fingerprint == fingerprint
        remote = RemoteTransport(
            address, fingerprint=fingerprint, wire_dtype="fp32", retries=0, timeout=DEADLINE
        )
        remote.channel.close()
        remote.channel, remote.stub = channel, pb_grpc.SplitServiceStub(channel)
        session = remote.open(GENERATE)
        assert session.id.endswith("-alice")
        assert prefill(session).shape == (1, 3, 64)
        session.close()
        channel.close()
        # the client's own transport presents the certificate (train/generate --tls-cert/--tls-key)
        own = RemoteTransport(
            address,
            tls_ca=pki["fedsplit-ca.crt"],
            tls_cert=pki["alice.crt"],
            tls_key=pki["alice.key"],
            fingerprint=fingerprint,
            wire_dtype="fp32",
            retries=0,
            timeout=DEADLINE,
        )
        session = own.open(GENERATE)
        assert session.id.endswith("-alice")
        session.close()
        own.channel.close()
        with pytest.raises(ValueError, match="both a client certificate and its key"):
            RemoteTransport(address, tls_cert=pki["alice.crt"])
        # no client certificate, or one the CA did not sign: the TLS handshake fails
        for client in (None, "mallory"):
            with _mtls_channel(address, pki, client) as other:
                with pytest.raises(grpc.RpcError) as exc:
                    pb_grpc.SplitServiceStub(other).Info(pb.InfoRequest(), timeout=DEADLINE)
                assert exc.value.code() == grpc.StatusCode.UNAVAILABLE, client


def test_authenticator_with_certificates_and_tokens(tmp_path):
    alice = {"x509_common_name": [b"alice"]}
    assert Authenticator(None, mutual_tls=True).identify((), alice).client == "alice"
    with pytest.raises(AuthError, match="no client certificate"):
        Authenticator(None, mutual_tls=True).identify((), {})
    with pytest.raises(AuthError, match="common name"):
        Authenticator(None, mutual_tls=True).identify((), {"x509_common_name": [b"../etc"]})
    # a certificate and a token: the token must be the certificate's client's
    tokens = TokenStore({"alice": hash_token("ta"), "bob": hash_token("tb")})
    both = Authenticator(tokens, mutual_tls=True)
    assert both.identify([("authorization", "Bearer ta")], alice).client == "alice"
    with pytest.raises(AuthError, match="not the token of 'alice'"):
        both.identify([("authorization", "Bearer tb")], alice)
    assert Authenticator(None).identify((), {}).client == "anonymous"


def test_public_bind_with_mutual_tls_and_no_token_file_is_allowed():
    assert exposure_problem(ServerConfig(host="0.0.0.0", tls_client_ca="ca.pem"), True, True) is None


# ------------------------------------------------------------------ revocation


def test_revoked_token_is_refused_and_its_sessions_closed_without_restart(tmp_path, fingerprint):
    tokens = tmp_path / "tokens"
    alice, bob = add_token(tokens, "alice"), add_token(tokens, "bob")
    audit = tmp_path / "audit.jsonl"
    servicer = build_servicer(config(audit_log=str(audit)), tokens_file=str(tokens))
    with start_background(servicer) as srv:
        a, b = transport(srv, fingerprint, alice), transport(srv, fingerprint, bob)
        live, bobs = a.open(GENERATE), b.open(GENERATE)
        prefill(live), prefill(bobs)
        parked = a.open(GENERATE)
        parked._outbox.put(None)  # drop the stream without Close: the server parks the session
        for _ in parked._call:
            pass
        assert wait_for(lambda: not servicer.sessions[parked.id].attached)

        revoke_token(tokens, "alice")

        message = refused(lambda: decode(live, 2), grpc.StatusCode.UNAUTHENTICATED)
        assert message == "the token of client 'alice' was revoked; the session is closed"
        refused(lambda: a.open(GENERATE), grpc.StatusCode.UNAUTHENTICATED)
        refused(lambda: a.open(GENERATE, resume=parked.id), grpc.StatusCode.UNAUTHENTICATED)
        assert decode(bobs, 2).shape == (1, 1, 64)  # bob goes on
        assert wait_for(lambda: {s.owner for s in servicer.sessions.values()} == {"bob"})
        assert set(servicer._reserved) == {bobs.id}
        bobs.close()
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    ends = {r["session"]: r for r in records if r["event"] in ("close", "evicted")}
    assert ends[live.id]["status"] == "UNAUTHENTICATED"
    assert ends[parked.id]["event"] == "evicted" and ends[parked.id]["reason"] == "revoked"
    stream_ends = [r["status"] for r in records if r["event"] == "close" and r["session"] == parked.id]
    assert stream_ends == ["parked"]
    assert ends[bobs.id]["status"] == "ok"


def test_token_store_follows_its_file(tmp_path):
    path = tmp_path / "tokens"
    token = add_token(path, "alice")
    store = TokenStore.load(path)
    assert not store.refresh() and store.client_for(token) == "alice"
    late = add_token(path, "carol")
    assert store.refresh() and store.client_for(late) == "carol"
    revoke_token(path, "alice")
    assert store.refresh() and store.client_for(token) is None and store.clients == {"carol"}
    with pytest.raises(ValueError, match="client 'alice' has no token in"):
        revoke_token(path, "alice")
    path.write_text("carol not-a-hash\n")  # a broken file accepts nobody
    assert store.refresh() and store.clients == set()
    path.unlink()
    assert store.refresh() and store.clients == set()


# ------------------------------------------------------------------ quotas


@pytest.fixture
def two_clients(tmp_path):
    """(token file, {client: token}) for alice and bob."""
    tokens = tmp_path / "tokens"
    return tokens, {name: add_token(tokens, name) for name in ("alice", "bob")}


def test_a_session_over_the_clients_limit_is_refused_and_other_clients_are_not(two_clients, fingerprint):
    tokens, token = two_clients
    servicer = build_servicer(config(client_max_sessions=1), tokens_file=str(tokens))
    with start_background(servicer) as srv:
        a, b = transport(srv, fingerprint, token["alice"]), transport(srv, fingerprint, token["bob"])
        first = a.open(GENERATE)
        message = refused(lambda: a.open(GENERATE), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert (
            message
            == "client 'alice' has 1 session(s) open, its limit on this server; close one before opening another"
        )
        bobs = b.open(GENERATE)
        first.close()
        assert wait_for(lambda: servicer.client_usage("alice")[0] == 0)
        a.open(GENERATE).close()  # room again
        bobs.close()


def test_session_memory_over_the_clients_budget_is_refused(two_clients, fingerprint):
    from fedsplit.server.opening import memory_needed

    tokens, token = two_clients
    probe = build_servicer(config())
    need = memory_needed(probe.body, GENERATE, probe.dtype)
    probe.executor.shutdown(wait=True)
    servicer = build_servicer(config(client_memory_budget=need * 3 // 2), tokens_file=str(tokens))
    with start_background(servicer) as srv:
        a, b = transport(srv, fingerprint, token["alice"]), transport(srv, fingerprint, token["bob"])
        first = a.open(GENERATE)
        message = refused(lambda: a.open(GENERATE), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "client 'alice' holds" in message and "limit on this server" in message
        b.open(GENERATE).close()
        first.close()


def test_rate_limits_refuse_decode_steps_and_optimiser_steps_past_the_bucket(two_clients, fingerprint):
    tokens, token = two_clients
    servicer = build_servicer(config(client_tokens_per_s=2, client_steps_per_s=1), tokens_file=str(tokens))
    now = [100.0]
    servicer.quotas.clock = lambda: now[0]  # a frozen clock: the bucket refills only when the test says
    with start_background(servicer) as srv:
        a, b = transport(srv, fingerprint, token["alice"]), transport(srv, fingerprint, token["bob"])
        gen, other = a.open(GENERATE), b.open(GENERATE)
        prefill(gen), prefill(other)  # prompts are not counted
        decode(gen, 2, 3), decode(gen, 3, 4)  # a bucket of 2 tokens
        message = refused(lambda: decode(gen, 4, 5), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert message == "client 'alice' is over its 2 decode tokens/s limit on this server; retry in 0.50 s"
        assert decode(other, 2, 3).shape == (1, 1, 64)  # bob's bucket is his own
        now[0] += 0.5
        assert decode(gen, 4, 5).shape == (1, 1, 64)  # the refused step did not advance the cache
        train = a.open(TRAIN)
        train.step()
        message = refused(train.step, grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "1 training steps/s limit" in message
        now[0] += 1.0
        train.step()
        for s in (gen, other, train):
            s.close()


def test_token_bucket():
    bucket = TokenBucket(rate=2.0, capacity=2.0, now=0.0)
    assert bucket.take(2, 0.0) == 0.0
    assert bucket.take(1, 0.0) == pytest.approx(0.5)
    assert bucket.take(1, 0.5) == 0.0
    # a cost above the capacity passes on a full bucket and leaves a debt
    assert bucket.take(5, 10.0) == 0.0 and bucket.take(1, 10.0) == pytest.approx(2.0)
    quotas = ClientQuotas(ServerConfig())
    assert quotas.charge("alice", "tokens", 10**6) is None  # no limit by default
    assert quotas.admit_stream("alice", 100) is None and quotas.admit_memory("alice", 1 << 40, 1) is None


# ------------------------------------------------------------------ audit log


AUDIT_KEYS = {
    "open": {"time", "event", "client", "session", "mode", "span", "max_length", "max_batch", "run_id", "resumed"},
    "close": {
        "time", "event", "client", "session", "mode", "span", "max_length", "max_batch", "run_id", "resumed",
        "duration_s", "requests", "errors", "tokens", "decode_tokens", "forwards", "backwards", "steps",
        "bytes_in", "bytes_out", "status",
    },
}  # fmt: skip


def test_audit_log_has_a_line_per_open_and_close_and_no_content(tmp_path, two_clients, fingerprint):
    tokens, token = two_clients
    audit = tmp_path / "audit.jsonl"
    servicer = build_servicer(config(audit_log=str(audit)), tokens_file=str(tokens))
    with start_background(servicer) as srv:
        a = transport(srv, fingerprint, token["alice"])
        gen = a.open(GENERATE)
        prefill(gen)
        decode(gen, 2, 3)
        gen.close()
        train = a.open(TRAIN)
        out = train.forward(1, torch.randn(1, 4, 64), torch.zeros(1, dtype=torch.long))
        train.backward(1, torch.ones_like(out))
        train.step()
        train.close()
        assert wait_for(lambda: len(audit.read_text().splitlines()) == 4)
    text = audit.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    assert [(r["event"], r["mode"]) for r in records] == [
        ("open", "generate"),
        ("close", "generate"),
        ("open", "train"),
        ("close", "train"),
    ]
    for r in records:
        assert set(r) == AUDIT_KEYS[r["event"]]
        assert r["client"] == "alice" and r["span"] == [1, 3]
        # only numbers, short names and ids: no tensor, prompt or token can hide in here
        for value in r.values():
            assert value is None or isinstance(value, (int, float, bool)) or len(str(value)) < 40
    gen_close, train_close = records[1], records[3]
    assert gen_close["status"] == train_close["status"] == "ok"
    assert (gen_close["tokens"], gen_close["decode_tokens"], gen_close["forwards"]) == (4, 1, 2)
    assert (train_close["forwards"], train_close["backwards"], train_close["steps"]) == (1, 1, 1)
    assert gen_close["bytes_in"] > 4 * 64 * 4 and gen_close["bytes_out"] > 4 * 64 * 4
    assert len(text) < 2000  # two sessions' hidden states alone are over 4 KB
