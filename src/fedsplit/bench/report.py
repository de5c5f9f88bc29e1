"""How the benches show their figures: tables on the terminal and flat JSON files."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

TRAIN_MODES_COLUMNS = (
    "RTT ms",
    "seq s",
    "client-batch s",
    "server-hier. s",
    "seq/cb",
    "seq/sh",
    "bound",
    "cb % of bound",
    "sh % of bound",
)


def write_json(data: dict, path: Path | None) -> None:
    """Write ``data`` as indented JSON to ``path`` (parents created); nothing when ``path`` is None."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    print(f"figures written to {path}")


def show_figures(figures: dict, json_path: Path | None, title: str) -> None:
    """Print a two-column table of ``figures``; with ``json_path`` also write them as one flat JSON object."""
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in figures.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)
    write_json(figures, json_path)


def _cpu_line(row: dict) -> str:
    """Busy cores and steal per run, and the fraction of the bound once steal is taken out."""
    busy = ", ".join(f"{m} {' '.join(f'{v:.2f}' for v in vs)}" for m, vs in row["busy_cores"].items())
    steal = ", ".join(f"{m} {' '.join(f'{v:.1f}' for v in vs)}" for m, vs in row["steal_s"].items())
    less_steal = ", ".join(
        f"{m} {100 * row[f'{m}_of_bound_less_steal']:.0f}%"
        for m in ("cb", "sh")
        if f"{m}_of_bound_less_steal" in row
    )
    return f"{row['rtt_ms']:g} ms, per run: cores busy {busy}; steal s {steal}; % of bound less steal {less_steal}"


def show_train_modes(figures: dict, out: Path | str, json_path: Path | None = None) -> None:
    """The `fedsplit bench train-modes` table: wall time per mode and RTT, speedups, the bound."""
    table = Table(
        title=f"fedsplit bench train-modes: {figures['model']}, {figures['clients']} clients, "
        f"{figures['examples_per_mode']} examples per mode; pure compute {figures['compute_s']:.1f}s"
    )
    for column in TRAIN_MODES_COLUMNS:
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
            console.print(_cpu_line(row))
    if figures["eval"]:
        console.print(
            "global model, first RTT: " + "; ".join(f"{m}: {v}" for m, v in figures["eval"].items())
        )
    console.print(f"report in {out}")
    write_json(figures, json_path)


def write_report(report: dict, out: Path, title: str) -> None:
    """report.json, report.md and loss.png (mean training loss over the clients per step)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    runs = report["runs"]
    lines = [
        f"# {title}",
        "",
        "| run | mode | rtt ms | wall s | examples/s | MiB on the wire | metric |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for run in runs:
        metric = ", ".join(f"{k} {v:.3f}" for k, v in (run.get("eval") or {}).items()) or "-"
        lines.append(
            f"| {run['name']} | {run['mode']} | {run['rtt_ms']:g} | {run['wall_seconds']:.1f} | "
            f"{run['examples_per_second']:.1f} | {run['bytes'] / 2**20:.1f} | {metric} |"
        )
    lines += [
        "",
        "Configuration:",
        "",
        "```json",
        json.dumps(report["config"], indent=2, default=str),
        "```",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    plot_losses(runs, out / "loss.png")


def plot_losses(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        curves = [c["losses"] for c in run["clients"]]
        steps = min(len(c) for c in curves)
        mean = np.mean([c[:steps] for c in curves], axis=0)
        ax.plot(range(1, steps + 1), mean, label=f"{run['name']} (mean of {len(curves)} clients)")
    ax.set_xlabel("client step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
