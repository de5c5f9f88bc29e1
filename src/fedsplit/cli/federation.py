"""`fedsplit simulate` and `fedsplit bench train-modes`: many clients on one machine. Thin: parse, call."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..bench.config import TrainModesConfig
from ..bench.simulate import SimulateConfig
from .app import app, bench_app
from .errors import fail
from .options import config_options


def _stop_on_sigterm() -> None:
    """SIGTERM (``kill``, a job scheduler) ends a run as Ctrl-C does: its server and client
    processes are stopped on the way out instead of being left behind."""
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


@app.command()
@config_options(SimulateConfig, section="simulate")
def simulate(cfg: SimulateConfig) -> None:
    """One server and N client processes on loopback: train, evaluate the global model, write a report."""
    _stop_on_sigterm()
    from ..bench.simulate import run_simulation
    from ..model.loading import ModelSpecError, UnsupportedModelError

    try:
        report = run_simulation(cfg)
    except (ValueError, ModelSpecError, UnsupportedModelError, FileNotFoundError) as exc:
        fail(str(exc))
    run = report["runs"][0]
    print(
        f"{cfg.mode}: {run['wall_seconds']:.1f}s for {run['examples']} examples "
        f"({run['examples_per_second']:.1f}/s); global model: {run.get('eval', '-')}; report in {cfg.out}"
    )


@bench_app.command("train-modes")
@config_options(TrainModesConfig)
def train_modes(
    cfg: TrainModesConfig,
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the figures to this JSON file"),
) -> None:
    """Wall time of sequential, client-batch and server-hierarchical training per RTT, with the bound."""
    _stop_on_sigterm()
    from ..bench.report import show_train_modes
    from ..bench.train_modes import run_train_modes

    try:
        figures = run_train_modes(cfg)
    except ValueError as exc:
        fail(str(exc))
    show_train_modes(figures, cfg.out, json_out)
