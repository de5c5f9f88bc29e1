"""`fedsplit serve` refuses an unsafe public bind before loading anything; quota, mTLS and audit
options reach the ServerConfig; `fedsplit token revoke` edits the token file."""

import pytest

from fedsplit.cli.main import app
from fedsplit.server.auth import TokenStore, add_token


def run_cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        app(list(args), prog_name="fedsplit")
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.fixture
def served(monkeypatch):
    """`fedsplit serve` up to the point where it would load the model: the ServerConfig it built."""
    import fedsplit.server.runner as runner

    seen = {}

    def build_servicer(config, tokens):
        seen["config"], seen["tokens"] = config, tokens

    async def serve_forever(*args):
        seen["tls"] = args[2:4]

    monkeypatch.setattr(runner, "build_servicer", build_servicer)
    monkeypatch.setattr(runner, "serve_forever", serve_forever)
    return seen


def test_public_bind_without_tls_and_tokens_fails_in_one_line_before_loading(capsys, served):
    code, _, err = run_cli(capsys, "serve", "--host", "0.0.0.0")
    assert code == 2 and "config" not in served
    assert err.strip() == (
        "error: refusing to serve on 0.0.0.0, beyond loopback, without TLS (--tls-cert and --tls-key) and "
        "client authentication (--tokens or --tls-client-ca); add them, or pass --insecure to serve anyway"
    )


def test_public_bind_with_tls_but_no_client_auth_names_only_that(tmp_path, capsys, served):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x"), key.write_text("x")
    code, _, err = run_cli(capsys, "serve", "--host", "::", "--tls-cert", str(cert), "--tls-key", str(key))
    assert code == 2 and "without client authentication (--tokens or --tls-client-ca)" in err


def test_insecure_public_bind_goes_ahead(capsys, served):
    code, _, err = run_cli(capsys, "serve", "--host", "0.0.0.0", "--insecure")
    assert code == 0, err
    assert served["config"].insecure and served["config"].host == "0.0.0.0"


def test_client_ca_needs_tls(tmp_path, capsys, served):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    code, _, err = run_cli(capsys, "serve", "--tls-client-ca", str(ca))
    assert code == 2 and "--tls-client-ca needs --tls-cert and --tls-key" in err
    code, _, err = run_cli(capsys, "serve", "--tls-client-ca", str(tmp_path / "missing.pem"))
    assert code == 2 and "--tls-client-ca: no file" in err


def test_quota_and_audit_options_reach_the_config(tmp_path, capsys, served):
    code, _, err = run_cli(
        capsys,
        "serve",
        "--client-max-sessions",
        "2",
        "--client-memory-budget",
        "64MiB",
        "--client-tokens-per-s",
        "20",
        "--client-steps-per-s",
        "0.5",
        "--audit-log",
        str(tmp_path / "audit.jsonl"),
    )
    assert code == 0, err
    cfg = served["config"]
    assert (cfg.client_max_sessions, cfg.client_memory_budget) == (2, 64 << 20)
    assert (cfg.client_tokens_per_s, cfg.client_steps_per_s) == (20.0, 0.5)
    assert cfg.audit_log == str(tmp_path / "audit.jsonl")
    code, _, err = run_cli(capsys, "serve", "--client-tokens-per-s", "-1")
    assert code == 2 and "--client-tokens-per-s must be >= 0" in err


def test_quotas_from_a_config_file(tmp_path, capsys, served):
    path = tmp_path / "serve.toml"
    path.write_text('[serve]\nclient_memory_budget = "1GiB"\nclient_max_sessions = 3\n')
    code, _, err = run_cli(capsys, "serve", "--config", str(path))
    assert code == 0, err
    assert (served["config"].client_memory_budget, served["config"].client_max_sessions) == (1 << 30, 3)


def test_token_revoke_removes_only_that_client(tmp_path, capsys):
    path = tmp_path / "tokens"
    add_token(path, "alice")
    bob = add_token(path, "bob")
    code, out, err = run_cli(capsys, "token", "revoke", "alice", "--tokens", str(path))
    assert code in (0, None), err
    assert "revoked the token of alice" in out
    store = TokenStore.load(path)
    assert store.clients == {"bob"} and store.client_for(bob) == "bob"
    code, _, err = run_cli(capsys, "token", "revoke", "alice", "--tokens", str(path))
    assert code == 2 and err.strip() == f"error: client 'alice' has no token in {path}"
    code, _, err = run_cli(capsys, "token", "revoke", "alice", "--tokens", str(tmp_path / "none"))
    assert code == 2 and "no token file" in err
