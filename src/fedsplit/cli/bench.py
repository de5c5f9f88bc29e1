"""`fedsplit bench generate|load|memory|quality|privacy`, `fedsplit attack` and `fedsplit demo`.

Each command's options are the fields of its config in :mod:`fedsplit.bench.config`; the
bench takes that config object and returns its figures, which :mod:`fedsplit.bench.report` shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..bench.config import (
    AttackConfig,
    CapacityBenchConfig,
    DemoConfig,
    GenerateBenchConfig,
    LoadBenchConfig,
    MemoryBenchConfig,
    PrivacyBenchConfig,
    QualityBenchConfig,
)
from .app import app, bench_app
from .errors import call, fail
from .options import config_options


def _json(help: str = "write the figures to this JSON file"):
    return typer.Option(None, "--json", help=help)


@bench_app.command("generate")
@config_options(GenerateBenchConfig)
def bench_generate(cfg: GenerateBenchConfig, json_out: Optional[Path] = _json()) -> None:
    """Split generation over loopback gRPC vs the unsplit model's generate, measured side by side."""
    from ..bench.generate import run
    from ..bench.report import show_figures

    show_figures(run(cfg), json_out, "fedsplit bench generate")


@bench_app.command("load")
@config_options(LoadBenchConfig)
def bench_load(cfg: LoadBenchConfig, json_out: Optional[Path] = _json()) -> None:
    """Many generation and training clients against one server: latency, throughput, errors, server RSS."""
    from ..bench.load import run
    from ..bench.report import show_figures

    show_figures(run(cfg), json_out, "fedsplit bench load")


@bench_app.command("memory")
@config_options(MemoryBenchConfig)
def bench_memory(cfg: MemoryBenchConfig, json_out: Optional[Path] = _json("write the figures here")) -> None:
    """Resident memory of the server (body only) and the client (head + tail) vs the unsplit model."""
    from ..bench.memory import run
    from ..bench.report import show_figures

    show_figures(run(cfg), json_out, "fedsplit bench memory")


@bench_app.command("quality")
@config_options(QualityBenchConfig)
def bench_quality(
    cfg: QualityBenchConfig, json_out: Optional[Path] = _json("also write the figures here")
) -> None:
    """Centralized vs split (no noise) vs split (noise): the task metric and wall time of each."""
    from ..bench.quality import run
    from ..bench.report import show_figures

    show_figures(run(cfg), json_out, "fedsplit bench quality")


@bench_app.command("privacy")
@config_options(PrivacyBenchConfig)
def bench_privacy(
    cfg: PrivacyBenchConfig, json_out: Optional[Path] = _json("also write the rows here")
) -> None:
    """Attacks x defences x strengths x p: a table and privacy-utility plots with the Pareto frontier.

    With --after-finetune each defence is judged on the model fine-tuned with it on: task metric
    and cost in points, strongest attack at the public, known-plaintext and oracle tiers. With
    --after-finetune --labels each gradient defence is judged the same way, against label inference
    from the gradients the server received during the fine-tuning."""
    from ..bench.report import write_json

    if cfg.grad_configs and not cfg.labels:
        fail("--grad-configs names gradient defences for --labels; add --after-finetune --labels")
    if cfg.labels:
        from ..bench.label_finetune import sweep as sweep_labels

        summary = call(sweep_labels, cfg)
        write_json(summary, json_out)
        out = Path(cfg.out or "results/privacy-ft")
        print((out / "labels.md").read_text())
        target = summary["target"]
        print(f"within 1 point and label attack within 5 points of chance: {', '.join(target) or 'none'}")
        print(f"{len(summary['rows'])} rows ({summary['seconds']:.0f}s this run); labels.jsonl in {out}")
        return
    if cfg.after_finetune:
        from ..bench.privacy_finetune import sweep as sweep_ft

        summary = call(sweep_ft, cfg)
        write_json(summary, json_out)
        out = Path(cfg.out)
        print((out / "privacy_ft.md").read_text())
        target = summary["target"]
        print(
            f"within 1 point and F1 <= 0.20 at the public and known-plaintext tiers: {', '.join(target) or 'none'}"
        )
        print(f"{len(summary['rows'])} rows ({summary['seconds']:.0f}s this run); frontier.png in {out}")
        return
    from ..bench.privacy import sweep

    summary = sweep(cfg)
    write_json(summary, json_out)
    out = Path(cfg.out)
    print((out / "privacy.md").read_text())
    print(f"{len(summary['rows'])} rows in {summary['seconds']:.0f}s; plots in {out}")


@app.command()
@config_options(AttackConfig)
def attack(cfg: AttackConfig, json_out: Optional[Path] = _json("write the figures here")) -> None:
    """What an honest-but-curious server recovers, and what the defence costs the task."""
    from ..bench.privacy import attack_with_cost
    from ..bench.report import show_figures

    show_figures(call(attack_with_cost, cfg), json_out, f"fedsplit attack {cfg.attack}")


@app.command()
@config_options(DemoConfig)
def demo(cfg: DemoConfig) -> None:
    """The whole system in one go: server, split fine-tuning with noise, accuracy, generation, bytes."""
    from ..bench.demo import run_demo

    call(run_demo, cfg)


@bench_app.command("capacity")
@config_options(CapacityBenchConfig)
def bench_capacity(cfg: CapacityBenchConfig, json_out: Optional[Path] = _json()) -> None:
    """What one server carries: decode tokens/s, latency and training steps/s for N synthetic sessions."""
    from ..bench.capacity import run, show

    show(call(run, cfg), json_out)
