"""`fedsplit audit`: what a curious server can read of your data from the states your client sends.

The client is built as `fedsplit eval` builds it (base model, the run's adapters and defence);
the audit itself is :func:`fedsplit.attacks.audit.audit_client`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import typer

from ..client.config import (
    MODEL_HELP,
    defense_field,
    device_field,
    dtype_field,
    tls_cert_field,
    tls_key_field,
)
from .app import app
from .errors import call, fail
from .options import config_options

DEFAULT_ATTACKS = (
    "probe-tied",
    "learned",
    "bisr",
)  # fedsplit.attacks.audit.DEFAULT_AUDIT_ATTACKS, without torch
DEFAULT_MODEL, DEFAULT_HEAD_LAYERS, DEFAULT_TAIL_LAYERS = "smollm2-135m", 2, 2


def parse_attacks(text: str) -> tuple[str, ...]:
    """A comma list of attack names (checked against the tier attacks when the audit starts)."""
    names = tuple(a.strip() for a in text.split(",") if a.strip())
    if not names:
        raise ValueError(f"takes a comma list of attacks, e.g. probe,learned,nearest (got {text!r})")
    return names


@dataclass
class AuditConfig:
    """Auditing a client on the user's own data; every field is a `fedsplit audit` option."""

    data: str | None = field(
        default=None,
        metadata={"help": "your texts: a JSONL file, each line an object with a 'prompt' or 'text' field"},
    )
    server: str | None = field(
        default=None, metadata={"help": "HOST:PORT of the fedsplit server your client talks to"}
    )
    adapters: str | None = field(
        default=None, metadata={"help": "run folder from `fedsplit train` (head/ body/ tail/, its defence)"}
    )
    model: str | None = field(
        default=None, metadata={"help": f"{MODEL_HELP} (default: the run's, else {DEFAULT_MODEL})"}
    )
    head_layers: int | None = field(
        default=None,
        metadata={"help": f"p: blocks in the client's head (default: the run's, else {DEFAULT_HEAD_LAYERS})"},
    )
    tail_layers: int | None = field(
        default=None,
        metadata={"help": f"q: blocks in the client's tail (default: the run's, else {DEFAULT_TAIL_LAYERS})"},
    )
    defense: str | None = defense_field(
        "the client's defence on the states it sends ('none' for none); unset: the run's own, else the default"
    )
    n: int = field(default=64, metadata={"help": "texts audited (the first N of --data)"})
    k: int = field(
        default=32,
        metadata={"help": "of those, texts the attacker knows with their states (known-plaintext tier)"},
    )
    attacks: tuple[str, ...] = field(
        default=DEFAULT_ATTACKS,
        metadata={"help": "the attacker's attacks, a comma list", "parse": parse_attacks, "metavar": "A,B"},
    )
    public: str | None = field(
        default=None,
        metadata={
            "help": "public text the attacker trains on: JSONL (prompt/text) or one text per line "
            "(default: the packaged dialogue prompts)"
        },
    )
    public_examples: int = field(default=1024, metadata={"help": "public texts the attacker uses at most"})
    quick: bool = field(
        default=False, metadata={"help": "a smaller attack budget (a first look, a weaker attacker)"}
    )
    labels: bool = field(
        default=False, metadata={"help": "your run trains a classifier (the label attack applies too)"}
    )
    wire_dtype: str = field(
        default="fp16", metadata={"help": "the wire dtype the states cross in: fp32 | fp16 | bf16 | int8"}
    )
    token: str | None = field(default=None, metadata={"help": "bearer token", "envvar": "FEDSPLIT_TOKEN"})
    tls_ca: str | None = field(default=None, metadata={"help": "CA certificate for TLS"})
    tls_cert: str | None = tls_cert_field()
    tls_key: str | None = tls_key_field()
    seed: int = field(default=0, metadata={"help": "which texts are known, and the attacker's seed"})
    device: str = device_field(
        "where the client and the attacker compute (and the body with --local): auto, cpu, cuda, cuda:N"
    )
    dtype: str = dtype_field()


def _run_summary(run: Path | None) -> dict:
    """The run's summary.json ({} without a run or the file)."""
    if run is None or not (run / "summary.json").exists():
        return {}
    return json.loads((run / "summary.json").read_text())


@app.command()
@config_options(AuditConfig)
def audit(
    local: bool = typer.Option(False, "--local", help="run the body in this process"),
    *,
    cfg: AuditConfig,
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the report here"),
) -> None:
    """What a curious server can read of YOUR data from the states YOUR client sends it."""
    from ..attacks.audit import (
        LABEL_NOT_RUN,
        audit_client,
        default_public_texts,
        read_public_texts,
        read_texts,
    )
    from ..attacks.tiers import TierConfig
    from ..bench.report import write_json
    from ..client.config import TrainConfig
    from ..client.train import build_client, defense_option_for_run, load_run_adapters
    from ..model.loading import load_tokenizer

    if local == (cfg.server is not None):
        fail("give exactly one of --local or --server HOST:PORT")
    if cfg.data is None:
        fail("give your texts with --data FILE (JSONL, a 'prompt' or 'text' field per line)")
    run = Path(cfg.adapters) if cfg.adapters is not None else None
    if run is not None and not run.is_dir():
        fail(f"--adapters {run}: no such folder")
    texts = call(read_texts, cfg.data)
    summary = _run_summary(run)
    run_config = summary.get("config") or {}
    model = cfg.model or run_config.get("model") or DEFAULT_MODEL
    p = cfg.head_layers if cfg.head_layers is not None else run_config.get("head_layers", DEFAULT_HEAD_LAYERS)
    q = cfg.tail_layers if cfg.tail_layers is not None else run_config.get("tail_layers", DEFAULT_TAIL_LAYERS)
    defense = defense_option_for_run(cfg.defense, run) if run is not None else cfg.defense
    train_cfg = TrainConfig(
        model=model,
        server=cfg.server,
        head_layers=p,
        tail_layers=q,
        defense=defense,
        wire_dtype=cfg.wire_dtype,
        token=cfg.token,
        tls_ca=cfg.tls_ca,
        tls_cert=cfg.tls_cert,
        tls_key=cfg.tls_key,
        seed=cfg.seed,
        device=cfg.device,
        dtype=cfg.dtype,
    )
    client = call(build_client, train_cfg, None, False)
    if run is not None:
        call(load_run_adapters, client, run)
    public = call(read_public_texts, cfg.public) if cfg.public else default_public_texts(cfg.public_examples)
    quick = dict(probe_steps=100, inverter_steps=100, finetune_steps=30) if cfg.quick else {}
    budget = TierConfig(seed=cfg.seed, **quick)
    classifier = cfg.labels or "accuracy" in (summary.get("after") or {})
    report = call(
        audit_client,
        client,
        load_tokenizer(model),
        texts,
        spec=model,
        head_layers=p,
        public_texts=public[: cfg.public_examples],
        defense_spec=train_cfg.defense_spec(),
        n=cfg.n,
        k=cfg.k,
        attacks=cfg.attacks,
        tier_config=budget,
        seed=cfg.seed,
        wire_dtype=cfg.wire_dtype,
        label_attack=LABEL_NOT_RUN if classifier else None,
    )
    show_audit(report)
    write_json(report.as_dict(), json_out)


def show_audit(report) -> None:
    """Print an :class:`~fedsplit.attacks.audit.AuditReport`: headline, a table per tier, examples."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    console.rule("[bold]fedsplit audit")
    console.print(f"[bold]{report.headline}[/bold]")
    console.print(
        f"{report.model}, p={report.head_layers}, defence {report.defense}, wire {report.wire_dtype}: "
        f"{report.scored} of your texts attacked; the known-plaintext attacker also knew {report.known_pairs} "
        f"with their states; {report.public_texts} public texts ({report.seconds:.0f} s)"
    )
    for result in report.tiers:
        best = result.strongest
        below = "" if best.tier == result.tier else f", from the {best.tier} tier"
        table = Table(
            title=f"{result.tier} tier: strongest {best.attack}{below}, token F1 {best.token_f1:.2f}"
        )
        for column in ("attack", "token F1", "precision", "recall"):
            table.add_column(column, justify="left" if column == "attack" else "right")
        for name, score in sorted(result.scores.items(), key=lambda item: -item[1].token_f1):
            table.add_row(
                name, f"{score.token_f1:.3f}", f"{score.token_precision:.3f}", f"{score.token_recall:.3f}"
            )
        console.print(table)
    strongest = report.strongest
    console.print(f"\n[bold]What the strongest attack ({strongest.attack}) read back[/bold]")
    for example in report.examples:
        console.print(f"  yours:     {escape(example['original'])}")
        console.print(f"  recovered: {escape(example['recovered'])}\n")
    if report.label_attack is not None:
        console.print(f"label attack: {report.label_attack}")
