"""`fedsplit simulate`: one server, N client processes on loopback, a report.

The server runs in its own process (``fedsplit serve --mode ...``), each client in its
own process with its partition of the task's training set. With ``rtt_ms`` or
``bandwidth_mbps`` the clients reach the server through :class:`ShapingProxy`, so
wide-area behaviour is measured on one machine. After training, client 0 saves the
global adapters (head/, body/, tail/ — the layout `fedsplit export` reads) and the
parent evaluates that global model on the task's test split.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..client.config import MODEL_HELP, device_field, dtype_field
from .workers import ClientPool, ClientSpec, Job

log = logging.getLogger(__name__)


def parse_ints(text: str) -> tuple[int, ...]:
    """``"2"`` or ``"1,2"`` -> ``(1, 2)``; ValueError says what is accepted."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(
            f"takes an integer or a comma-separated list (e.g. 2 or 1,2), not {text!r}"
        ) from None


def parse_floats(text: str) -> tuple[float, ...]:
    """``"0,20,50"`` -> ``(0.0, 20.0, 50.0)``; ValueError says what is accepted."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"takes comma-separated numbers (e.g. 0,20,50), not {text!r}") from None


@dataclass
class SimulateConfig:
    """One simulated federation; every field is a `fedsplit simulate` option."""

    model: str = field(default="smollm2-135m", metadata={"help": MODEL_HELP})
    clients: int = field(default=8, metadata={"help": "client processes"})
    mode: str = field(
        default="server-hierarchical", metadata={"help": "sequential | client-batch | server-hierarchical"}
    )
    task: str = field(default="sentiment", metadata={"help": "task name (fedsplit.tasks)"})
    partition: str = field(default="iid", metadata={"help": "iid or dirichlet:ALPHA (label skew)"})
    steps: int = field(default=100, metadata={"help": "training steps per client"})
    batch_size: int = field(default=8, metadata={"help": "examples per client step"})
    lr: float = field(default=2e-4, metadata={"help": "AdamW learning rate (head, body and tail LoRA)"})
    body_lr: float | None = field(
        default=None, metadata={"help": "AdamW learning rate of the server's body LoRA (default: lr)"}
    )
    body_warmup: int = field(
        default=0,
        metadata={
            "help": "body optimiser steps over which the body lr ramps up linearly from body_lr / W "
            "(0 = constant; W = clients starts client-batch at the sequential lr)"
        },
    )
    max_length: int = field(default=128, metadata={"help": "token limit per example"})
    max_examples: int | None = field(default=None, metadata={"help": "cap on the task's training examples"})
    head_layers: tuple[int, ...] = field(
        default=(2,),
        metadata={
            "help": "p; a comma list cycles over the clients (server-hierarchical allows different p per client)",
            "parse": parse_ints,
            "metavar": "P[,P...]",
        },
    )
    tail_layers: tuple[int, ...] = field(
        default=(2,),
        metadata={
            "help": "q; a comma list cycles over the clients",
            "parse": parse_ints,
            "metavar": "Q[,Q...]",
        },
    )
    sync_every: int = field(
        default=10, metadata={"help": "server-hierarchical: FedAvg of body replicas every R steps"}
    )
    fedavg_every: int = field(
        default=10, metadata={"help": "FedAvg of head/tail adapters every R steps (0 = off)"}
    )
    round_timeout: float = field(default=60.0, metadata={"help": "seconds a round waits for missing clients"})
    gather_ms: float = field(
        default=250.0,
        metadata={
            "help": "server-hierarchical: how long a body pass waits for clients about to send a forward"
        },
    )
    server_threads: int = field(
        default=0,
        metadata={"help": "compute threads of the server (0: one per core); every client computes with one"},
    )
    rtt_ms: float = field(
        default=0.0, metadata={"help": "round-trip time added by a shaping proxy on loopback"}
    )
    bandwidth_mbps: float = field(default=0.0, metadata={"help": "per-client bandwidth cap (0 = none)"})
    wire_dtype: str = field(default="fp16", metadata={"help": "fp32 | fp16 | bf16 | int8"})
    rank: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha"})
    seed: int = field(default=0, metadata={"help": "seed for partition, data order and LoRA init"})
    eval_examples: int = field(
        default=200, metadata={"help": "test examples for the global model (0 = skip)"}
    )
    out: str = field(
        default="runs/simulate", metadata={"help": "report folder (report.json/.md, loss.png, global/)"}
    )
    device: str = device_field("where the clients and the server compute: auto, cpu, cuda, cuda:N")
    dtype: str = dtype_field(
        "compute dtype of clients and server: auto (bf16 on CUDA, fp32 on cpu), fp32, bf16, fp16"
    )

    def check(self) -> None:
        """Raise ValueError with what to change, for options that cannot work."""
        from ..server.coordination.base import check_mode  # here: the config stays cheap to import

        check_mode(self.mode)
        if self.mode == "independent":
            raise ValueError(
                "simulate needs a federated mode: sequential, client-batch or server-hierarchical"
            )
        if self.clients < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("--clients, --steps and --batch-size must be at least 1")
        if self.body_warmup < 0:
            raise ValueError("--body-warmup must be 0 (constant lr) or a number of optimiser steps")
        if self.mode == "server-hierarchical" and self.sync_every and self.steps % self.sync_every:
            raise ValueError(
                f"--steps {self.steps} is not a multiple of --sync-every {self.sync_every}: the last "
                f"body sync would not include the final steps; use e.g. --steps "
                f"{math.ceil(self.steps / self.sync_every) * self.sync_every}"
            )
        from ..tasks.partition import parse_scheme

        parse_scheme(self.partition)

    def specs(self) -> list[ClientSpec]:
        heads, tails = list(self.head_layers) or [2], list(self.tail_layers) or [2]
        return [
            ClientSpec(
                index=i,
                n_clients=self.clients,
                model=self.model,
                task=self.task,
                partition=self.partition,
                head_layers=heads[i % len(heads)],
                tail_layers=tails[i % len(tails)],
                batch_size=self.batch_size,
                max_length=self.max_length,
                max_examples=self.max_examples,
                lr=self.lr,
                rank=self.rank,
                alpha=self.alpha,
                seed=self.seed,
                wire_dtype=self.wire_dtype,
                device=self.device,
                dtype=self.dtype,
            )
            for i in range(self.clients)
        ]

    def serve_args(self) -> list[str]:
        from .procs import placement_args

        hierarchical = self.mode == "server-hierarchical"
        # server-hierarchical averages heads and tails at its body syncs: 0 leaves the period to
        # the server's rule (ServerConfig.fedavg_period), which clients then learn from Info
        fedavg = 0 if hierarchical and self.sync_every else self.fedavg_every
        return [
            "--mode",
            self.mode,
            "--sync-every",
            str(self.sync_every if hierarchical else 0),
            "--fedavg-every",
            str(fedavg),
            "--round-timeout",
            str(self.round_timeout),
            "--gather-ms",
            str(self.gather_ms),
            "--memory-budget",
            "1024GiB",
            "--threads",
            str(self.server_threads or os.cpu_count() or 1),
            *placement_args(self.device, self.dtype),
        ]


@contextlib.contextmanager
def one_thread_per_process():
    """Child processes started inside get one compute thread each (unless they set their own).

    Every party shares the machine's cores; several multi-threaded processes on the same
    cores make OpenMP threads spin-wait for each other, which costs far more than it gains.
    The server is the exception (``--threads``, :attr:`SimulateConfig.server_threads`): its
    body is most of the compute, and in the rounds of client-batch (and whenever clients
    wait for it) it is the only party computing.
    """
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old


@contextlib.contextmanager
def federation_server(cfg: SimulateConfig, log_path: Path):
    """``fedsplit serve`` in ``cfg.mode`` in a child process; yields its address."""
    from .procs import server_process

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        log_file = stack.enter_context(open(log_path, "ab"))
        with one_thread_per_process():
            address, _ = stack.enter_context(server_process(cfg.model, *cfg.serve_args(), log_file=log_file))
        yield address


@contextlib.contextmanager
def network(address: str, cfg: SimulateConfig):
    """The address clients dial: the server's, or a shaping proxy's in front of it (``cfg.rtt_ms``)."""
    from .proxy import ShapingProxy

    if cfg.rtt_ms > 0 or cfg.bandwidth_mbps > 0:
        host, port = address.rsplit(":", 1)
        with ShapingProxy((host, int(port)), cfg.rtt_ms, cfg.bandwidth_mbps) as proxy:
            yield proxy.address
    else:
        yield address


def run_job(
    pool: ClientPool,
    cfg: SimulateConfig,
    out: Path,
    name: str,
    progress: bool = True,
    save_dir: Path | None = None,
    server: str | None = None,
) -> dict:
    """One training run of every client of ``pool`` under ``cfg``; returns the run's figures.

    Starts a server for ``cfg`` unless ``server`` is the address of one already running in
    ``cfg.mode`` (a server starts a new federation once the last client of the previous one
    has left). Client 0 saves the global adapters to ``save_dir`` (default ``out/global``).
    """
    from tqdm import tqdm

    total = cfg.clients * cfg.steps
    bar = tqdm(total=total, desc=f"{name}", disable=not progress, dynamic_ncols=True, leave=False)
    losses: dict[int, list[float]] = {}

    def on_step(event: dict) -> None:
        losses.setdefault(event["client"], []).append(event["loss"])
        bar.update(1)
        bar.set_postfix(loss=f"{event['loss']:.3f}")

    try:
        with contextlib.ExitStack() as stack:
            if server is None:
                server = stack.enter_context(federation_server(cfg, out / f"server-{name}.log"))
            address = stack.enter_context(network(server, cfg))
            job = Job(
                address=address,
                steps=cfg.steps,
                name=name,
                save_dir=str(save_dir or out / "global"),
                body_lr=cfg.body_lr,
                body_warmup=cfg.body_warmup,
            )
            started, results = pool.run(job, on_step)
    finally:
        bar.close()
    wall = max(r["end"] for r in results) - started
    examples = cfg.clients * cfg.steps * cfg.batch_size
    return {
        "name": name,
        "mode": cfg.mode,
        "rtt_ms": cfg.rtt_ms,
        "bandwidth_mbps": cfg.bandwidth_mbps,
        "wall_seconds": wall,
        "examples": examples,
        "examples_per_second": examples / wall,
        "bytes": sum(r["bytes_sent"] + r["bytes_received"] for r in results),
        "clients": [
            {
                k: r[k]
                for k in (
                    "client",
                    "examples",
                    "labels",
                    "span",
                    "losses",
                    "fedavg_rounds",
                    "bytes_sent",
                    "bytes_received",
                )
            }
            | {"seconds": r["end"] - r["start"]}
            for r in results
        ],
    }


class GlobalModel:
    """The split model in this process with the global adapters loaded: evaluates a run's result."""

    def __init__(
        self,
        model: str,
        head_layers: int,
        tail_layers: int,
        rank: int,
        alpha: float,
        device: str = "auto",
        dtype: str = "auto",
    ) -> None:
        from ..model.loading import load_tokenizer
        from ..model.lora import LoraSettings, add_lora
        from ..model.split import load_split

        self.model = model
        self.split = load_split(model, head_layers, tail_layers, dtype=dtype, device=device)
        settings = LoraSettings(rank=rank, alpha=alpha)
        for segment in (self.split.head, self.split.body, self.split.tail):
            add_lora(segment, settings)
        self.tokenizer = load_tokenizer(model)

    def load(self, adapters: Path) -> None:
        from ..model.lora import load_lora_state_dict, lora_state_dict, read_adapter

        for name in ("head", "body", "tail"):
            segment = getattr(self.split, name)
            state, _ = read_adapter(adapters / name)
            own = lora_state_dict(segment)
            missing = set(own) - set(state)
            if missing:
                raise ValueError(
                    f"{adapters / name} lacks {len(missing)} LoRA weights of the {name} "
                    f"(e.g. {sorted(missing)[0]}); was it trained with other partition points?"
                )
            load_lora_state_dict(segment, {k: v for k, v in state.items() if k in own})

    def evaluate(self, task, max_examples: int) -> dict:
        import torch

        from ..tasks import evaluate

        device = next(self.split.head.parameters()).device

        def logits_fn(ids, pad):  # the task layer's CPU tensors in, its CPU logits out
            with torch.no_grad():
                return self.split(ids.to(device), pad.to(device)).cpu()

        return evaluate(
            task, self.tokenizer, logits_fn, split="test", max_examples=max_examples, progress=False
        )


def run_simulation(cfg: SimulateConfig, progress: bool = True) -> dict:
    """Train ``cfg.clients`` clients against one server, evaluate the global model, write the report."""
    cfg.check()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with ClientPool(cfg.specs(), wait=False) as pool:
        with federation_server(cfg, out / f"server-{cfg.mode}.log") as address:  # starts while clients load
            pool.wait_loaded()
            log.info("%d client processes loaded in %.0fs", cfg.clients, time.perf_counter() - t0)
            run = run_job(pool, cfg, out, cfg.mode, progress, server=address)
    if cfg.eval_examples > 0:
        from ..tasks import load_task

        model = GlobalModel(
            cfg.model, cfg.head_layers[0], cfg.tail_layers[0], cfg.rank, cfg.alpha, cfg.device, cfg.dtype
        )
        model.load(out / "global")
        task = load_task(cfg.task, max_examples=cfg.max_examples, seed=cfg.seed)
        run["eval"] = model.evaluate(task, cfg.eval_examples)
    from .report import write_report

    report = {"config": asdict(cfg), "runs": [run]}
    write_report(report, out, f"fedsplit simulate: {cfg.clients} clients, {cfg.mode}")
    return report
