"""`fedsplit serve`: options from :class:`~fedsplit.server.config.ServerConfig`, plus TLS, tokens, threads.

Beyond loopback it refuses to start without TLS and client authentication (tokens or mutual TLS)
unless --insecure; the check runs before the model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..server.config import ServerConfig
from .app import app
from .errors import call, fail
from .options import config_options


@app.command()
@config_options(ServerConfig, section="serve")
def serve(
    cfg: ServerConfig,
    tls_cert: Optional[Path] = typer.Option(None, help="PEM certificate; with --tls-key enables TLS"),
    tls_key: Optional[Path] = typer.Option(None, help="PEM private key"),
    tokens: Optional[Path] = typer.Option(
        None, help="token file (`fedsplit token add`); every call then needs a bearer token"
    ),
    threads: int = typer.Option(0, help="compute threads for the body (0: torch's default, one per core)"),
) -> None:
    """Run the body of a split model as a gRPC service (until SIGTERM / Ctrl-C)."""
    import asyncio

    if threads < 0:
        fail("--threads must be >= 0")
    if cfg.gather_ms < 0:
        fail("--gather-ms must be >= 0")
    if (tls_cert is None) != (tls_key is None):
        fail("TLS needs both --tls-cert and --tls-key")
    for flag, path in (
        ("--tls-cert", tls_cert),
        ("--tls-key", tls_key),
        ("--tls-client-ca", cfg.tls_client_ca),
    ):
        if path is not None and not Path(path).is_file():
            fail(f"{flag}: no file {path}")
    if tokens is not None and not tokens.is_file():
        fail(f"--tokens: no token file {tokens} (create it with `fedsplit token add NAME --tokens {tokens}`)")
    for flag, value in (
        ("--client-max-sessions", cfg.client_max_sessions),
        ("--client-tokens-per-s", cfg.client_tokens_per_s),
        ("--client-steps-per-s", cfg.client_steps_per_s),
    ):
        if value < 0:
            fail(f"{flag} must be >= 0 (0 = no limit)")
    if cfg.stages < 1:
        fail("--stages must be >= 1")
    if threads:
        import torch

        torch.set_num_threads(threads)

    from ..server.runner import build_servicer, exposure_problem, serve_forever

    problem = exposure_problem(cfg, tls_cert is not None, tokens is not None or cfg.tls_client_ca is not None)
    if cfg.tls_client_ca and tls_cert is None:
        fail("--tls-client-ca needs --tls-cert and --tls-key: mutual TLS runs over TLS")
    if problem and not cfg.insecure:
        fail(problem)  # before loading the model; with --insecure, start_server logs a warning
    # --threads of a staged server: torch threads of each stage actor (its front end computes nothing)
    staged = threads and (cfg.stages > 1 or len(cfg.stage_layers or ()) > 1)
    servicer = call(
        build_servicer, cfg, str(tokens) if tokens else None, **({"threads": threads} if staged else {})
    )
    asyncio.run(
        serve_forever(servicer, cfg, str(tls_cert) if tls_cert else None, str(tls_key) if tls_key else None)
    )
