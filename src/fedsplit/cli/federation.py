"""`fedsplit simulate` and `fedsplit bench train-modes`: many clients on one machine. Thin: parse, call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

MODEL_HELP = "preset (smollm2-135m, tiny-llama), Hugging Face id, local directory or .gguf file"

# Work small enough for a 2-core machine: the default model's figures take minutes, not hours.
BENCH_DEFAULTS = {
    "tiny-llama": {
        "steps": 40,
        "batch_size": 2,
        "max_length": 48,
        "sync_every": 10,
        "layers": 1,
        "eval": 200,
        # its ops are far too small to share across threads: a second server thread only spins
        # (measured: server-hierarchical 9.8 s -> 13.5 s at 20 ms)
        "server_threads": 1,
    },
    "default": {
        "steps": 4,
        "batch_size": 2,
        "max_length": 64,
        "sync_every": 2,
        "layers": 2,
        "eval": 100,
        "server_threads": 0,  # one per core: the body is most of the compute
    },
}


def _stop_on_sigterm() -> None:
    """SIGTERM (``kill``, a job scheduler) ends a run as Ctrl-C does: its server and client
    processes are stopped on the way out instead of being left behind."""
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        _fail(f"{option} takes an integer or a comma-separated list (e.g. 2 or 1,2), not {text!r}")
    return values


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        _fail(f"{option} takes comma-separated numbers (e.g. 0,20,50), not {text!r}")


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add `simulate` to ``app`` and `train-modes` to ``bench_app``."""

    @app.command()
    def simulate(
        clients: int = typer.Option(8, help="client processes"),
        mode: str = typer.Option(
            "server-hierarchical", help="sequential | client-batch | server-hierarchical"
        ),
        model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
        task: str = typer.Option("sentiment", help="task (fedsplit.tasks)"),
        partition: str = typer.Option("iid", help="iid or dirichlet:ALPHA (label skew)"),
        steps: int = typer.Option(100, help="training steps per client"),
        batch_size: int = typer.Option(8, help="examples per client step"),
        lr: float = typer.Option(2e-4, help="AdamW learning rate"),
        body_lr: Optional[float] = typer.Option(
            None, help="AdamW learning rate of the server's body LoRA (default: --lr)"
        ),
        body_warmup: int = typer.Option(
            0,
            help="body optimiser steps over which the body lr ramps up linearly from body-lr / W "
            "(0 = constant; W = --clients starts client-batch at the sequential lr)",
        ),
        max_length: int = typer.Option(128, help="token limit per example"),
        max_examples: Optional[int] = typer.Option(None, help="cap on the task's training examples"),
        head_layers: str = typer.Option(
            "2",
            help="p; a comma list cycles over the clients (server-hierarchical "
            "allows different p per client)",
        ),
        tail_layers: str = typer.Option("2", help="q; a comma list cycles over the clients"),
        sync_every: int = typer.Option(
            10, help="server-hierarchical: FedAvg of the body replicas every R steps"
        ),
        fedavg_every: int = typer.Option(10, help="FedAvg of head/tail adapters every R steps (0 = off)"),
        round_timeout: float = typer.Option(60.0, help="seconds a round waits for missing clients"),
        gather_ms: float = typer.Option(
            250.0, help="server-hierarchical: how long a body pass waits for clients about to send a forward"
        ),
        rtt_ms: float = typer.Option(0.0, help="round-trip time added by a shaping proxy on loopback"),
        bandwidth_mbps: float = typer.Option(0.0, help="per-client bandwidth cap of the proxy (0 = none)"),
        wire_dtype: str = typer.Option("fp16", help="fp32 | fp16 | bf16 | int8"),
        seed: int = typer.Option(0, help="seed for partition, data order and LoRA init"),
        eval_examples: int = typer.Option(200, help="test examples for the global model (0 = skip)"),
        server_threads: int = typer.Option(0, help="compute threads of the server (0: one per core)"),
        out: Path = typer.Option(
            Path("runs/simulate"), help="report folder (report.json/.md, loss.png, global/)"
        ),
    ) -> None:
        """One server and N client processes on loopback: train, evaluate the global model, write a report."""
        _stop_on_sigterm()
        from ..federation.simulate import SimulateConfig, run_simulation
        from ..model.loading import ModelSpecError, UnsupportedModelError

        cfg = SimulateConfig(
            model=model,
            clients=clients,
            mode=mode,
            task=task,
            partition=partition,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            body_lr=body_lr,
            body_warmup=body_warmup,
            max_length=max_length,
            max_examples=max_examples,
            head_layers=_ints(head_layers, "--head-layers"),
            tail_layers=_ints(tail_layers, "--tail-layers"),
            sync_every=sync_every,
            fedavg_every=fedavg_every,
            round_timeout=round_timeout,
            gather_ms=gather_ms,
            rtt_ms=rtt_ms,
            bandwidth_mbps=bandwidth_mbps,
            wire_dtype=wire_dtype,
            seed=seed,
            eval_examples=eval_examples,
            server_threads=server_threads,
            out=str(out),
        )
        try:
            report = run_simulation(cfg)
        except (ValueError, ModelSpecError, UnsupportedModelError, FileNotFoundError) as exc:
            _fail(str(exc))
        run = report["runs"][0]
        print(
            f"{mode}: {run['wall_seconds']:.1f}s for {run['examples']} examples "
            f"({run['examples_per_second']:.1f}/s); global model: {run.get('eval', '-')}; report in {out}"
        )

    @bench_app.command("train-modes")
    def train_modes(
        clients: int = typer.Option(8, help="client processes"),
        rtt_ms: str = typer.Option("0,20,50", help="round-trip times to measure, comma-separated"),
        model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
        steps: Optional[int] = typer.Option(
            None, help="steps per client (default: 40 on tiny-llama, else 4)"
        ),
        batch_size: Optional[int] = typer.Option(None, help="examples per step (default: 2)"),
        max_length: Optional[int] = typer.Option(
            None, help="token limit (default: 48 on tiny-llama, else 64)"
        ),
        sync_every: Optional[int] = typer.Option(
            None, help="body/head/tail FedAvg period in steps, all modes"
        ),
        head_layers: Optional[int] = typer.Option(None, help="p (default: 1 on tiny-llama, else 2)"),
        tail_layers: Optional[int] = typer.Option(None, help="q (default: 1 on tiny-llama, else 2)"),
        partition: str = typer.Option("iid", help="iid or dirichlet:ALPHA"),
        bandwidth_mbps: float = typer.Option(0.0, help="per-client bandwidth cap at RTT > 0 (0 = none)"),
        lr: float = typer.Option(2e-4, help="AdamW learning rate"),
        eval_examples: Optional[int] = typer.Option(
            None,
            help="test examples per mode's global model, at the first RTT (default: 200 on tiny-llama, "
            "else 100; 0 = skip)",
        ),
        repeats: int = typer.Option(1, help="runs per mode and RTT, interleaved; medians are reported"),
        server_threads: Optional[int] = typer.Option(
            None,
            help="compute threads of the server, every mode (0: one per core; default: 1 on tiny-llama, "
            "else 0); clients use one each",
        ),
        gather_ms: float = typer.Option(
            250.0, help="server-hierarchical: how long a body pass waits for clients about to send a forward"
        ),
        body_lr_scale: str = typer.Option(
            "linear",
            help="body LoRA learning rate of the parallel modes: linear = lr x clients (one body step "
            "covers every client's batch), sqrt = lr x sqrt(clients), none = lr",
        ),
        out: Path = typer.Option(Path("results/train-modes"), help="report folder"),
        json_out: Optional[Path] = typer.Option(None, "--json", help="write the figures to this JSON file"),
    ) -> None:
        """Wall time of sequential, client-batch and server-hierarchical training per RTT, with the bound."""
        _stop_on_sigterm()
        from rich.console import Console
        from rich.table import Table

        from ..federation.bench import TrainModesConfig, run_train_modes
        from ..federation.simulate import SimulateConfig

        d = BENCH_DEFAULTS.get(model, BENCH_DEFAULTS["default"])
        every = sync_every or d["sync_every"]
        sim = SimulateConfig(
            model=model,
            clients=clients,
            partition=partition,
            steps=steps or d["steps"],
            batch_size=batch_size or d["batch_size"],
            max_length=max_length or d["max_length"],
            head_layers=(head_layers if head_layers is not None else d["layers"],),
            tail_layers=(tail_layers if tail_layers is not None else d["layers"],),
            lr=lr,
            sync_every=every,
            fedavg_every=every,
            bandwidth_mbps=bandwidth_mbps,
            eval_examples=0,
            server_threads=server_threads if server_threads is not None else d["server_threads"],
            gather_ms=gather_ms,
        )
        cfg = TrainModesConfig(
            rtt_ms=_floats(rtt_ms, "--rtt-ms"),
            eval_examples=eval_examples if eval_examples is not None else d["eval"],
            repeats=repeats,
            body_lr_scale=body_lr_scale,
            out=str(out),
        )
        try:
            figures = run_train_modes(sim, cfg)
        except ValueError as exc:
            _fail(str(exc))
        table = Table(
            title=f"fedsplit bench train-modes: {model}, {clients} clients, "
            f"{figures['examples_per_mode']} examples per mode; pure compute "
            f"{figures['compute_s']:.1f}s"
        )
        for column in (
            "RTT ms",
            "seq s",
            "client-batch s",
            "server-hier. s",
            "seq/cb",
            "seq/sh",
            "bound",
            "cb % of bound",
            "sh % of bound",
        ):
            table.add_column(column, justify="right")
        for row in figures["rows"]:
            table.add_row(
                f"{row['rtt_ms']:g}",
                f"{row['seq_s']:.1f}",
                f"{row['cb_s']:.1f}",
                f"{row['sh_s']:.1f}",
                f"{row['speedup_cb']:.2f}x",
                f"{row['speedup_sh']:.2f}x",
                f"{row['bound']:.2f}x",
                f"{100 * row['cb_of_bound']:.0f}%",
                f"{100 * row['sh_of_bound']:.0f}%",
            )
        console = Console()
        console.print(table)
        for row in figures["rows"]:
            if "steal_s" in row:
                console.print(
                    f"{row['rtt_ms']:g} ms, per run: cores busy "
                    + ", ".join(
                        f"{m} {' '.join(f'{v:.2f}' for v in vs)}" for m, vs in row["busy_cores"].items()
                    )
                    + "; steal s "
                    + ", ".join(f"{m} {' '.join(f'{v:.1f}' for v in vs)}" for m, vs in row["steal_s"].items())
                    + "; % of bound less steal "
                    + ", ".join(
                        f"{m} {100 * row[f'{m}_of_bound_less_steal']:.0f}%"
                        for m in ("cb", "sh")
                        if f"{m}_of_bound_less_steal" in row
                    )
                )
        if figures["eval"]:
            console.print(
                "global model, first RTT: " + "; ".join(f"{m}: {v}" for m, v in figures["eval"].items())
            )
        console.print(f"report in {out}")
        if json_out:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(figures, indent=2))
            print(f"figures written to {json_out}")
