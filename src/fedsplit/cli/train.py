"""`fedsplit train` and `fedsplit eval`: options from :class:`TrainConfig` and :class:`EvalConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..client.config import EvalConfig, TrainConfig
from .app import app
from .errors import call, fail
from .options import config_options


@app.command()
@config_options(TrainConfig, defaults={"out": "runs/latest"}, section="train")
def train(
    local: bool = typer.Option(False, "--local", help="run the body in this process"),
    *,
    cfg: TrainConfig,
) -> None:
    """Fine-tune with LoRA: head/tail here, body LoRA on the server (or --local / --centralized)."""
    from ..client.train import run_training

    if sum([cfg.server is not None, local, cfg.centralized]) != 1:
        fail("give exactly one of --server HOST:PORT, --local or --centralized")
    summary = call(run_training, cfg)
    print(f"{cfg.task}: {summary['after']}  ({summary['train_seconds']:.0f}s; adapters in {cfg.out})")


@app.command("eval")
@config_options(EvalConfig)
def eval_(
    cfg: EvalConfig,
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the metrics here"),
) -> None:
    """Score the base or a fine-tuned model on a task, split (--server) or centralized.

    A split client sends through --defense SPEC (unset: the run's own defence and its trained
    state with --adapters, else the default defence); --defense without --server or --adapters
    scores the split model in this process.
    """
    from ..bench.report import show_figures
    from ..client.train import build_eval_client, evaluate_client
    from ..model.loading import load_tokenizer
    from ..tasks import load_task

    client = call(build_eval_client, cfg)
    scored = call(load_task, cfg.task, seed=cfg.seed, path=cfg.data)
    metrics = evaluate_client(client, scored, load_tokenizer(cfg.model), cfg.split, cfg.max_examples)
    show_figures(metrics, json_out, f"fedsplit eval {cfg.task}")
