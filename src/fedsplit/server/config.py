"""How a server runs: every field is a ``fedsplit serve`` option (and a key of its config file)."""

from __future__ import annotations

from dataclasses import dataclass, field

# wire.codec.DEFAULT_MAX_MESSAGE_BYTES (tests/cli/test_options.py checks they agree), not imported:
# the CLI builds its options from this module at start-up and the wire package loads torch and grpc.
DEFAULT_MAX_MESSAGE_BYTES = 256 << 20

MODEL_HELP = "preset (smollm2-135m, tiny-llama), Hugging Face id, local directory or .gguf file"
#: Admission budget of a server on the CPU when ``--memory-budget`` is not given (on CUDA it
#: follows the GPU's free memory: fedsplit.server.placement.resolve_memory_budget).
CPU_MEMORY_BUDGET = 4 << 30


def parse_layers(text: str) -> tuple[int, int]:
    """``"A:B"`` -> ``(A, B)``; ValueError says what is accepted."""
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"takes A:B (e.g. 0:30), not {text!r}") from None
    return start, end


def parse_stage_layers(text: str) -> tuple[tuple[int, int], ...]:
    """``"0:10,10:20,20:30"`` -> ``((0, 10), (10, 20), (20, 30))``: contiguous, non-empty spans."""
    spans = tuple(parse_layers(part) for part in text.split(","))
    for (start, end), following in zip(spans, spans[1:] + ((None, None),)):
        if end <= start:
            raise ValueError(f"takes contiguous non-empty spans A:B,B:C,... (e.g. 0:15,15:30), not {text!r}")
        if following[0] is not None and following[0] != end:
            raise ValueError(f"takes contiguous spans, each starting where the previous ends, not {text!r}")
    return spans


def parse_size(text: str) -> int:
    """Bytes from ``"4GiB"``, ``"512MiB"``, ``"1.5GB"`` or plain ``"1048576"`` (humanfriendly's syntax:
    KiB/MiB/GiB are powers of 1024, KB/MB/GB of 1000)."""
    import humanfriendly

    try:
        return int(humanfriendly.parse_size(text))
    except humanfriendly.InvalidSize:
        raise ValueError(f"takes a size such as 4GiB, 512MiB or 1048576, not {text!r}") from None


def parse_message_size(text: str) -> int:
    """:func:`parse_size`, within what gRPC takes as a message limit (a signed 32-bit int)."""
    size = parse_size(text)
    if not 0 < size < 1 << 31:
        raise ValueError(f"takes a size from 1 byte to under 2GiB (gRPC's limit), not {text!r}")
    return size


def format_size(size: int) -> str:
    """The shortest exact text :func:`parse_size` reads back: ``4GiB``, ``256MiB``, ``1000``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def parse_budget(text: str) -> int | None:
    """:func:`parse_size`, or None for ``"auto"`` (the server picks: see ``ServerConfig.memory_budget``)."""
    if text.strip().lower() == "auto":
        return None
    return parse_size(text)


# Field metadata of options given as a size: text on the command line and in config files.
SIZE = {"parse": parse_size, "format": format_size, "metavar": "SIZE"}


@dataclass
class ServerConfig:
    """How the server runs; every field is a `fedsplit serve` option."""

    model: str = field(default="smollm2-135m", metadata={"help": MODEL_HELP})
    layers: tuple[int, int] | None = field(
        default=None,
        metadata={
            "help": "decoder layers A:B this server holds (default: all); "
            "any client whose body span lies inside is served",
            "parse": parse_layers,
            "format": lambda span: f"{span[0]}:{span[1]}",
            "metavar": "A:B",
        },
    )
    stages: int = field(
        default=1,
        metadata={
            "help": "pipeline stages: split the body into S contiguous spans (balanced by parameters), "
            "each a Ray actor with one GPU when the cluster has them (needs the ray extra); "
            "1 = one process, no Ray"
        },
    )
    ray_address: str | None = field(
        default=None,
        metadata={
            "help": "with --stages: the Ray cluster to run the stages on (auto, or HOST:PORT of its head); "
            "default: start a local Ray instance",
            "metavar": "auto|HOST:PORT",
        },
    )
    stage_layers: tuple[tuple[int, int], ...] | None = field(
        default=None,
        metadata={
            "help": "with --stages: the layers of each stage, contiguous, covering the held layers "
            "(default: balanced by parameters)",
            "parse": parse_stage_layers,
            "format": lambda spans: ",".join(f"{a}:{b}" for a, b in spans),
            "metavar": "A:B,B:C,...",
        },
    )
    device: str = field(
        default="auto",
        metadata={
            "help": "where the body runs: auto (cuda when torch sees a GPU, else cpu), cpu, cuda or cuda:N"
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "compute dtype of the body: auto (bf16 on cuda, fp32 on cpu), fp32, bf16 or fp16; "
            "independent of the wire dtype each client picks"
        },
    )
    host: str = field(default="127.0.0.1", metadata={"help": "bind address (loopback by default)"})
    port: int = field(default=7070, metadata={"help": "port; 0 picks a free one"})
    memory_budget: int | None = field(
        default=None,
        metadata={
            "help": "memory for session state (KV caches, training graphs, adapters); admission refuses "
            "sessions beyond it with RESOURCE_EXHAUSTED (default auto: 4GiB on cpu, 90% of the GPU's "
            "free memory after loading the body on cuda)",
            **SIZE,
            "parse": parse_budget,
        },
    )
    session_ttl: float = field(
        default=600.0, metadata={"help": "seconds before an abandoned session is freed"}
    )
    graph_ttl: float = field(
        default=300.0, metadata={"help": "seconds a training forward waits for its backward"}
    )
    max_graphs: int = field(default=16, metadata={"help": "pending training forwards per session"})
    max_message_bytes: int = field(
        default=DEFAULT_MAX_MESSAGE_BYTES,
        metadata={
            "help": "largest gRPC message either way (clients learn it from Info)",
            **SIZE,
            "parse": parse_message_size,
        },
    )
    checkpoint_dir: str | None = field(
        default=None,
        metadata={
            "help": "checkpoint training runs (clients' --run-id) here, so they survive a server restart"
        },
    )
    checkpoint_every: int = field(
        default=100, metadata={"help": "checkpoint each run every K optimizer steps (and on SIGTERM)"}
    )
    checkpoint_keep: int = field(default=3, metadata={"help": "checkpoints kept per run"})
    mode: str = field(
        default="independent",
        metadata={
            "help": "training of many clients: independent (a body adapter per "
            "session), sequential, client-batch or server-hierarchical (docs/federation.md)"
        },
    )
    sync_every: int = field(
        default=0,
        metadata={"help": "server-hierarchical: average the body replicas every R steps (0 = never)"},
    )
    fedavg_every: int = field(
        default=0,
        metadata={
            "help": "clients average their head/tail adapters every R steps "
            "(0 = never; server-hierarchical: at the body syncs)"
        },
    )
    round_timeout: float = field(
        default=30.0, metadata={"help": "seconds a round waits for missing clients before going on"}
    )
    gather_ms: float = field(
        default=250.0,
        metadata={
            "help": "server-hierarchical: how long a body pass waits for the forwards "
            "of clients about to send one, to run them together (0 = never wait)"
        },
    )
    shutdown_grace: float = field(
        default=5.0,
        metadata={"help": "seconds open calls get to finish on SIGTERM / Ctrl-C before they are cut"},
    )
    insecure: bool = field(
        default=False,
        metadata={
            "help": "serve on an address beyond loopback without TLS or client authentication "
            "(refused otherwise; logs a warning)"
        },
    )
    tls_client_ca: str | None = field(
        default=None,
        metadata={
            "help": "mutual TLS: require a client certificate signed by this CA (PEM file); a client's id "
            "is its certificate's common name (with --tokens too, the token must be that client's)",
            "metavar": "FILE",
        },
    )
    audit_log: str | None = field(
        default=None,
        metadata={
            "help": "append one JSON line per session open and close to this file: client, mode, span, "
            "tokens, steps, bytes, duration, status (never content)",
            "metavar": "FILE",
        },
    )
    client_max_sessions: int = field(
        default=0,
        metadata={"help": "sessions each client may hold on open streams at once (0 = no limit)"},
    )
    client_memory_budget: int | None = field(
        default=None,
        metadata={
            "help": "session memory (KV caches, training graphs) each client may reserve, parked sessions "
            "included; beyond it RESOURCE_EXHAUSTED (default: only --memory-budget applies)",
            **SIZE,
        },
    )
    client_tokens_per_s: float = field(
        default=0.0,
        metadata={
            "help": "decode tokens per second per client (rows of one-token forwards; a bucket of one "
            "second's worth); beyond it a step is refused with RESOURCE_EXHAUSTED (0 = no limit)"
        },
    )
    client_steps_per_s: float = field(
        default=0.0,
        metadata={
            "help": "training optimiser steps per second per client (a bucket of one second's worth); "
            "beyond it a step is refused with RESOURCE_EXHAUSTED (0 = no limit)"
        },
    )

    def fedavg_period(self) -> int:
        """Steps between head/tail FedAvg rounds (0 = none); ``InfoReply.fedavg_every`` tells clients.

        ``fedavg_every`` when set; otherwise server-hierarchical averages heads and tails at its
        body syncs (every ``sync_every`` steps), and the other modes not at all.
        """
        if self.fedavg_every:
            return self.fedavg_every
        return self.sync_every if self.mode == "server-hierarchical" else 0
