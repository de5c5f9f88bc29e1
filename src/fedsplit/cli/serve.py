"""`fedsplit serve`: options from :class:`~fedsplit.server.config.ServerConfig`, plus TLS, tokens, threads."""

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
    if threads:
        import torch

        torch.set_num_threads(threads)

    from ..server.runner import build_servicer, serve_forever

    servicer = call(build_servicer, cfg, str(tokens) if tokens else None)
    asyncio.run(
        serve_forever(servicer, cfg, str(tls_cert) if tls_cert else None, str(tls_key) if tls_key else None)
    )
