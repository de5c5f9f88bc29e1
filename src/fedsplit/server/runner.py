"""Start a server for ``fedsplit serve`` (until SIGTERM) or in a background thread (tests, demo, bench)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import threading
from dataclasses import dataclass

import grpc
import torch

from ..model.device import resolve_device, resolve_dtype
from ..model.loading import load_config, model_fingerprint
from ..model.split import load_part, num_layers
from ..wire import codec
from ..wire import fedsplit_pb2_grpc as pb_grpc
from .auth import TokenStore
from .config import ServerConfig
from .service import SplitServicer, body_worker

log = logging.getLogger(__name__)


def build_servicer(
    config: ServerConfig, tokens_file: str | None = None, body=None, threads: int = 0
) -> SplitServicer:
    """Load only the held body layers, on ``config.device`` in ``config.dtype``, and wrap them in the service.

    A ``body`` given here is served where it already is (its device and dtype win over the config's).
    With ``config.stages`` > 1 the layers are loaded by Ray actors instead (:mod:`.stages`; ``threads``:
    torch threads per stage, 0 = one per CPU the stage gets).
    """
    worker = body_worker()
    if body is None and (config.stages > 1 or len(config.stage_layers or ()) > 1):
        from .stages import build_staged_servicer  # imports Ray: only a staged server needs it

        tokens = TokenStore.load(tokens_file) if tokens_file else None
        return build_staged_servicer(config, model_fingerprint(config.model), tokens, worker, threads)
    if config.ray_address:
        raise ValueError("--ray-address runs the body's stages on Ray: give --stages 2 or more too")
    if body is None:
        device = resolve_device(config.device)  # a bad name fails before anything is loaded
        dtype = resolve_dtype(config.dtype, device)
        n = num_layers(load_config(config.model))
        layers = config.layers or (0, n)
        # Loaded on the body worker, the thread that will run it: one thread of parallel torch work
        # per process (see body_worker). The worker takes this thread's torch thread count.
        worker.submit(torch.set_num_threads, torch.get_num_threads()).result()
        body = worker.submit(
            load_part, config.model, "body", span=layers, device=device, dtype=dtype
        ).result()
    tokens = TokenStore.load(tokens_file) if tokens_file else None
    return SplitServicer(body, config, model_fingerprint(config.model), tokens, executor=worker)


def is_loopback(host: str) -> bool:
    """Whether ``host`` binds only to this machine: 127.0.0.0/8, ::1 or ``localhost``."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve to anything
        return False


def exposure_problem(config: ServerConfig, tls: bool, client_auth: bool) -> str | None:
    """Why serving on ``config.host`` would expose the body unsafely (one line), or None.

    Beyond loopback a server needs TLS (``tls``: a certificate and key) and a way to authenticate
    clients (``client_auth``: a token file or ``--tls-client-ca``); ``--insecure`` overrides.
    """
    if is_loopback(config.host):
        return None
    missing = []
    if not tls:
        missing.append("TLS (--tls-cert and --tls-key)")
    if not client_auth:
        missing.append("client authentication (--tokens or --tls-client-ca)")
    if not missing:
        return None
    return (
        f"refusing to serve on {config.host}, beyond loopback, without {' and '.join(missing)}; "
        "add them, or pass --insecure to serve anyway"
    )


def check_exposure(config: ServerConfig, tls: bool, client_auth: bool) -> None:
    """ValueError with :func:`exposure_problem`'s line, unless ``config.insecure`` (then a warning)."""
    if config.tls_client_ca and not tls:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key: mutual TLS runs over TLS")
    problem = exposure_problem(config, tls, client_auth)
    if problem is None:
        return
    if not config.insecure:
        raise ValueError(problem)
    log.warning(
        "--insecure: %s; anyone who can reach this port can use the body and read what clients send",
        problem.split(";")[0].replace("refusing to serve", "serving"),
    )


async def start_server(
    servicer: SplitServicer, config: ServerConfig, tls_cert: str | None = None, tls_key: str | None = None
) -> tuple[grpc.aio.Server, int]:
    """Start serving; returns the server and the bound port.

    Refuses (ValueError, before binding) to serve beyond loopback without TLS and client
    authentication unless ``config.insecure`` (:func:`check_exposure`). With
    ``config.tls_client_ca`` clients must present a certificate signed by that CA (mutual TLS).
    """
    tls = bool(tls_cert and tls_key)
    check_exposure(config, tls, servicer.tokens is not None or config.tls_client_ca is not None)
    # Keepalive pings find peers that vanished without closing their TCP connection (a host that
    # lost power); their streams then break, their sessions are parked and the TTL frees them.
    keepalive = [  # accept clients' pings too
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
    ]
    server = grpc.aio.server(options=codec.channel_options(config.max_message_bytes) + keepalive)
    pb_grpc.add_SplitServiceServicer_to_server(servicer, server)
    address = f"{config.host}:{config.port}"
    if tls:
        with open(tls_key, "rb") as k, open(tls_cert, "rb") as c:
            pair = (k.read(), c.read())
        client_ca = None
        if config.tls_client_ca:
            with open(config.tls_client_ca, "rb") as f:
                client_ca = f.read()
        creds = grpc.ssl_server_credentials(
            [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
        )
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    await server.start()
    return server, port


async def _evict_forever(servicer: SplitServicer, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        await servicer.evict_idle()


async def serve_forever(servicer, config, tls_cert=None, tls_key=None, ready=None) -> None:
    server, port = await start_server(servicer, config, tls_cert, tls_key)
    log.info("serving layers %s of %s on %s:%d", list(servicer.body.span), config.model, config.host, port)
    if config.memory_budget is not None:
        source = "--memory-budget"
    else:
        source = "90% of the GPU's free memory" if servicer.device.type == "cuda" else "the CPU default"
    log.info(
        "body on %s in %s; sessions may reserve %.1f MiB (%s)",
        servicer.device,
        str(servicer.dtype).removeprefix("torch."),
        servicer.memory_budget / 2**20,
        source,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (RuntimeError, ValueError):  # not the main thread
            pass
    evictor = asyncio.create_task(_evict_forever(servicer, min(30.0, config.session_ttl / 4)))
    if ready is not None:
        ready(port, stop, loop)
    await stop.wait()
    log.info("shutting down")
    evictor.cancel()
    await server.stop(grace=config.shutdown_grace)
    saved = await servicer.checkpoint_all()  # streams are gone; the worker finishes any step first
    if saved:
        log.info("checkpointed %d training run(s) on shutdown", saved)
    await servicer.aclose()
    if servicer.audit is not None:
        servicer.audit.close()


@dataclass
class BackgroundServer:
    """A server on a free loopback port in a thread; ``stop()`` shuts it down."""

    servicer: SplitServicer
    port: int
    thread: threading.Thread
    _stop: asyncio.Event
    _loop: asyncio.AbstractEventLoop

    @property
    def address(self) -> str:
        return f"{self.servicer.config.host}:{self.port}"

    def stop(self) -> None:
        if self.thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self.thread.join(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start_background(servicer: SplitServicer, tls_cert=None, tls_key=None) -> BackgroundServer:
    box: dict = {}
    ready = threading.Event()

    def on_ready(port, stop, loop):
        box.update(port=port, stop=stop, loop=loop)
        ready.set()

    def run():
        try:
            asyncio.run(serve_forever(servicer, servicer.config, tls_cert, tls_key, on_ready))
        except BaseException as exc:  # surface bind errors to the caller
            box["error"] = exc
            ready.set()

    thread = threading.Thread(target=run, name="fedsplit-server", daemon=True)
    thread.start()
    ready.wait(timeout=60)
    if "error" in box:
        raise box["error"]
    return BackgroundServer(servicer, box["port"], thread, box["stop"], box["loop"])
