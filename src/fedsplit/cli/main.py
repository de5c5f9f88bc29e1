"""The ``fedsplit`` command. Thin: parse options, call the layers."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import FedsplitCLI

app = FedsplitCLI(
    add_completion=False, no_args_is_help=True, help="Federated split learning and inference of LLMs."
)
token_app = typer.Typer(no_args_is_help=True, help="Manage client tokens for `fedsplit serve --tokens`.")
bench_app = typer.Typer(
    no_args_is_help=True, help="Reproducible measurements (ratios measured side by side)."
)
app.add_typer(token_app, name="token")
app.add_typer(bench_app, name="bench")

MODEL_HELP = "preset (smollm2-135m, tiny-llama), Hugging Face id, local directory or .gguf file"


def fail(message: str) -> None:
    """A user-caused error: one line, no traceback."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
def generate(
    prompt: list[str] = typer.Option(..., "--prompt", help="prompt text; repeat for a batch"),
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    server: Optional[str] = typer.Option(None, help="HOST:PORT of a fedsplit server"),
    local: bool = typer.Option(False, "--local", help="run all three segments in this process"),
    head_layers: int = typer.Option(2, help="p: decoder blocks in the client's head"),
    tail_layers: int = typer.Option(2, help="q: decoder blocks in the client's tail"),
    max_new_tokens: int = typer.Option(64, help="tokens to generate"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0, help="nucleus sampling threshold"),
    stream: bool = typer.Option(False, "--stream", help="print tokens as they arrive (batch of one)"),
    token: Optional[str] = typer.Option(None, envvar="FEDSPLIT_TOKEN", help="bearer token"),
    tls_ca: Optional[Path] = typer.Option(None, help="CA certificate to verify the server's TLS certificate"),
    wire_dtype: str = typer.Option("fp16", help="fp32 | fp16 | bf16 | int8"),
    adapters: Optional[Path] = typer.Option(
        None, help="directory with head/ and tail/ adapters from fedsplit train"
    ),
    noise: float = typer.Option(0.0, help="Gaussian noise std on hidden states sent"),
) -> None:
    """Generate text with the split model (chat template applied)."""
    from ..client.api import SplitModelForCausalLM

    if local == (server is not None):
        fail("give exactly one of --local or --server HOST:PORT")
    defense = _defense(noise, False)
    lm = _open(
        SplitModelForCausalLM.from_pretrained,
        model,
        server,
        head_layers,
        tail_layers,
        token,
        tls_ca,
        wire_dtype,
        defense,
        adapters,
    )
    ids, pad = lm.encode_chat(prompt)
    mask = _mask(ids, pad)
    on_token = None
    if stream and len(prompt) == 1:

        def on_token(tok):
            sys.stdout.write(lm.tokenizer.decode(tok, skip_special_tokens=True))
            sys.stdout.flush()

    out = lm.generate(
        ids,
        mask,
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature or 1.0,
        top_p=top_p,
        on_token=on_token,
    )
    if on_token is not None:
        print()
        return
    for row in out:
        print(lm.tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True).strip())


def _mask(ids, pad):
    import torch

    return (torch.arange(ids.shape[1])[None] >= pad[:, None]).long()


def _defense(noise: float, relative: bool):
    if noise <= 0:
        return None
    from ..privacy import parse_defense

    return parse_defense(f"gaussian:{noise}" + (":relative" if relative else ""))


def _open(factory, *args, **kwargs):
    """Call into the layers; a user-caused error becomes one line, no traceback."""
    from ..model.loading import ModelSpecError, UnsupportedModelError

    try:
        return factory(*args, **kwargs)
    except (ModelSpecError, UnsupportedModelError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    except ConnectionError as exc:
        fail(str(exc))


@app.command()
def export(
    adapters: Path = typer.Option(..., help="directory with head/, body/ and tail/ adapters"),
    out: Path = typer.Option(..., help="output directory for the merged adapter"),
    model: Optional[str] = typer.Option(None, help=f"{MODEL_HELP}; with --merged, also write a merged model"),
    merged: bool = typer.Option(
        False, "--merged", help="also write the base model with the adapter merged in"
    ),
) -> None:
    """Merge head, body and tail adapters into one adapter for the unsplit model."""
    from ..model.lora import export_adapter

    try:
        path = export_adapter(adapters, out, base_model=model)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    print(f"adapter written to {path}  (PeftModel.from_pretrained(model, '{path}'))")
    if merged:
        if model is None:
            fail("--merged needs --model")
        from peft import PeftModel

        from ..model.loading import load_model

        base, tokenizer = load_model(model)
        full = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
        full.save_pretrained(str(out / "merged"))
        tokenizer.save_pretrained(str(out / "merged"))
        print(f"merged model written to {out / 'merged'}")


@app.command()
def train(
    ctx: typer.Context,
    server: Optional[str] = typer.Option(None, help="HOST:PORT of a fedsplit server (omit with --local)"),
    local: bool = typer.Option(False, "--local", help="run the body in this process"),
    centralized: bool = typer.Option(
        False, "--centralized", help="baseline: the unsplit model, one process, same LoRA, no noise"
    ),
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    head_layers: int = typer.Option(2, help="p: decoder blocks in the client's head"),
    tail_layers: int = typer.Option(2, help="q: decoder blocks in the client's tail"),
    task: str = typer.Option(
        "sentiment", help="task (sentiment, summarization, dialogue, jsonl, boolq, ...)"
    ),
    data: Optional[str] = typer.Option(
        None,
        help="the task's data: a JSONL file or folder (--task jsonl), a local copy or hub id (other tasks)",
    ),
    steps: int = typer.Option(200, help="optimizer steps"),
    batch_size: int = typer.Option(8, help="examples per step"),
    lr: float = typer.Option(2e-4, help="AdamW learning rate"),
    body_lr: Optional[float] = typer.Option(
        None, help="learning rate of the body LoRA on the server (default: --lr)"
    ),
    body_warmup: int = typer.Option(
        0, help="body optimiser steps over which the body lr ramps up linearly (0 = constant)"
    ),
    max_length: int = typer.Option(128, help="token limit per example"),
    max_examples: Optional[int] = typer.Option(None, help="cap on examples per split"),
    noise: float = typer.Option(
        0.0, help="Gaussian noise std on hidden states sent (absolute; see --noise-relative)"
    ),
    noise_relative: bool = typer.Option(
        False, "--noise-relative", help="--noise is relative to each token's RMS"
    ),
    defense: Optional[str] = typer.Option(
        None, help="privacy defence spec, e.g. dp:clip=1,sigma=0.5 (overrides --noise)"
    ),
    wire_dtype: str = typer.Option("fp16", help="fp32 | fp16 | bf16 | int8"),
    seed: int = typer.Option(0, help="seed for data order, LoRA init and noise"),
    eval_every: int = typer.Option(0, help="evaluate on the validation split every N steps"),
    eval_examples: int = typer.Option(200, help="examples per evaluation"),
    rank: int = typer.Option(8, help="LoRA rank"),
    alpha: float = typer.Option(16.0, help="LoRA alpha"),
    token: Optional[str] = typer.Option(None, envvar="FEDSPLIT_TOKEN", help="bearer token"),
    tls_ca: Optional[Path] = typer.Option(None, help="CA certificate for TLS"),
    out: Path = typer.Option(
        Path("runs/latest"), help="where adapters (head/, body/, tail/) and summary.json go"
    ),
    checkpoint_every: int = typer.Option(
        0,
        help="every K steps save head/tail LoRA, optimizer and data position "
        "under OUT/checkpoints and ask the server to checkpoint the body",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="continue the run in OUT from the last step client and server both hold"
    ),
    run_id: Optional[str] = typer.Option(
        None, help="name of the run on the server (default: random, kept in OUT/run.json)"
    ),
    config: Optional[Path] = typer.Option(
        None,
        "--config",
        help="TOML or YAML file of train options (the fields "
        "of TrainConfig); options on the command line win",
    ),
) -> None:
    """Fine-tune with LoRA: head/tail here, body LoRA on the server (or --local / --centralized)."""
    from ..client.train import TrainConfig, run_training

    values = dict(
        model=model,
        server=server,
        head_layers=head_layers,
        tail_layers=tail_layers,
        task=task,
        data=data,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        body_lr=body_lr,
        body_warmup=body_warmup,
        max_length=max_length,
        max_examples=max_examples,
        noise=noise,
        noise_relative=noise_relative,
        defense=defense,
        wire_dtype=wire_dtype,
        seed=seed,
        eval_every=eval_every,
        eval_examples=eval_examples,
        rank=rank,
        alpha=alpha,
        centralized=centralized,
        token=token,
        tls_ca=str(tls_ca) if tls_ca else None,
        out=str(out),
        checkpoint_every=checkpoint_every,
        resume=resume,
        run_id=run_id,
    )
    if config is not None:
        values.update(_from_config_file(ctx, config, TrainConfig, "train", values))
        server, centralized = values["server"], values["centralized"]
    if sum([server is not None, local, centralized]) != 1:
        fail("give exactly one of --server HOST:PORT, --local or --centralized")
    cfg = TrainConfig(**values)
    summary = _open(run_training, cfg)
    print(f"{task}: {summary['after']}  ({summary['train_seconds']:.0f}s; adapters in {out})")


def _from_config_file(ctx: typer.Context, path: Path, cls, section: str, cli_values: dict) -> dict:
    """Values from a config file, except those given on the command line (or by environment variable)."""
    from .config import load_dataclass_file

    def given(name: str) -> bool:  # by name: typer may bring its own copy of click's ParameterSource
        return getattr(ctx.get_parameter_source(name), "name", None) in ("COMMANDLINE", "ENVIRONMENT")

    values = load_dataclass_file(path, cls, section)
    return {k: v for k, v in values.items() if k not in cli_values or not given(k)}


def _report(figures: dict, json_path: Path | None, title: str) -> None:
    """Print a two-column table; with --json write the figures as one flat JSON object."""
    import json

    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in figures.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(figures, indent=2))
        print(f"figures written to {json_path}")


@bench_app.command("generate")
def bench_generate(
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    new_tokens: int = typer.Option(128, help="tokens generated per run (greedy, batch 1)"),
    head_layers: int = typer.Option(2, help="p"),
    tail_layers: int = typer.Option(2, help="q"),
    wire_dtype: str = typer.Option("fp16", help="fp32 | fp16 | bf16 | int8"),
    context: int = typer.Option(512, help="prompt length for the cache vs no-cache comparison"),
    no_cache_tokens: int = typer.Option(8, help="tokens timed for the cache vs no-cache comparison"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the figures to this JSON file"),
) -> None:
    """Split generation over loopback gRPC vs the unsplit model's generate, measured side by side."""
    from ..bench.generate import run

    _report(
        run(model, new_tokens, head_layers, tail_layers, wire_dtype, context, no_cache_tokens),
        json_out,
        "fedsplit bench generate",
    )


@bench_app.command("load")
def bench_load(
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    gen_clients: int = typer.Option(32, help="concurrent generation clients (one session each at a time)"),
    train_clients: int = typer.Option(8, help="concurrent training clients"),
    seconds: float = typer.Option(120.0, help="how long the clients keep going"),
    head_layers: int = typer.Option(2, help="p"),
    tail_layers: int = typer.Option(2, help="q"),
    wire_dtype: str = typer.Option("fp16", help="fp32 | fp16 | bf16 | int8"),
    prompt_tokens: int = typer.Option(32, help="prompt length of each generation"),
    new_tokens: int = typer.Option(32, help="tokens per generation"),
    train_batch: int = typer.Option(2, help="examples per training step"),
    train_length: int = typer.Option(64, help="tokens per training example"),
    memory_budget: str = typer.Option("4GiB", help="the server's --memory-budget"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the figures to this JSON file"),
) -> None:
    """Many generation and training clients against one server: latency, throughput, errors, server RSS."""
    from ..bench.load import run

    _report(
        run(
            model,
            gen_clients,
            train_clients,
            seconds,
            head_layers,
            tail_layers,
            wire_dtype,
            prompt_tokens,
            new_tokens,
            train_batch,
            train_length,
            memory_budget,
        ),
        json_out,
        "fedsplit bench load",
    )


@app.command()
def attack(
    attack_name: str = typer.Option(
        "vmi", "--attack", help="vmi | relaxation | learned | bisr | nearest | label"
    ),
    defense: Optional[str] = typer.Option(None, help="defence spec on the hidden states, e.g. gaussian:0.05"),
    head_layers: int = typer.Option(2, help="p: blocks in the client's head"),
    task: str = typer.Option("sentiment", help="victim texts come from this task's test split"),
    n: int = typer.Option(200, help="victim examples"),
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    seed: int = typer.Option(0, help="seed"),
    quick: bool = typer.Option(False, "--quick", help="fewer optimisation steps"),
    utility_examples: int = typer.Option(48, help="task examples for the defence's utility cost"),
    grad_defense: Optional[str] = typer.Option(
        None, help="label attack: defence on the gradient the client sends, e.g. gaussian:0.3:relative"
    ),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the figures here"),
) -> None:
    """What an honest-but-curious server recovers, and what the defence costs the task."""
    from ..bench.privacy import attack_with_cost

    row = _open(
        attack_with_cost,
        attack_name,
        defense,
        head_layers,
        task,
        n,
        model,
        seed,
        quick,
        utility_examples,
        grad_defense,
    )
    _report(row, json_out, f"fedsplit attack {attack_name}")


@bench_app.command("privacy")
def bench_privacy(
    quick: bool = typer.Option(False, "--quick", help="small grid (<= 5 min); default: the full sweep"),
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    task: str = typer.Option("sentiment", help="victim texts and utility task"),
    out: Path = typer.Option(Path("results/privacy"), help="folder for privacy.json, privacy.md, PNG plots"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the rows here"),
) -> None:
    """Attacks x defences x strengths x p: a table and privacy-utility plots with the Pareto frontier."""
    import json

    from ..bench.privacy import sweep

    summary = sweep(quick, model, task, out)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(summary, indent=2))
    print((out / "privacy.md").read_text())
    print(f"{len(summary['rows'])} rows in {summary['seconds']:.0f}s; plots in {out}")


@bench_app.command("memory")
def bench_memory(
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    head_layers: int = typer.Option(2, help="p"),
    tail_layers: int = typer.Option(2, help="q"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the figures here"),
) -> None:
    """Resident memory of the server (body only) and the client (head + tail) vs the unsplit model."""
    from ..bench.memory import run

    _report(run(model, head_layers, tail_layers), json_out, "fedsplit bench memory")


@bench_app.command("quality")
def bench_quality(
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    task: str = typer.Option("sentiment", help="task to fine-tune and score"),
    steps: int = typer.Option(100, help="training steps per run"),
    batch_size: int = typer.Option(8, help="examples per step"),
    lr: float = typer.Option(3e-4, help="learning rate"),
    eval_examples: int = typer.Option(300, help="test examples scored per run"),
    max_length: int = typer.Option(96, help="token limit per example"),
    noise: float = typer.Option(0.02, help="the 'default noise' run: Gaussian std relative to token RMS"),
    seed: int = typer.Option(0, help="same seed and data for every run"),
    head_layers: int = typer.Option(2, help="p of the split runs"),
    tail_layers: int = typer.Option(2, help="q of the split runs"),
    wire_dtype: str = typer.Option(
        "fp32",
        help="wire dtype of the split runs: fp32 isolates the split itself; "
        "fp16/bf16/int8 add the wire's rounding",
    ),
    out: Path = typer.Option(Path("results/quality"), help="folder for quality.json / quality.md / adapters"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the figures here"),
) -> None:
    """Centralized vs split (no noise) vs split (noise): the task metric and wall time of each."""
    from ..bench.quality import run

    figures = run(
        model,
        task,
        steps,
        batch_size,
        lr,
        eval_examples,
        seed,
        noise,
        max_length,
        out,
        wire_dtype=wire_dtype,
        head_layers=head_layers,
        tail_layers=tail_layers,
    )
    _report(figures, json_out, "fedsplit bench quality")


@app.command("eval")
def eval_(
    task: str = typer.Option("sentiment", help="task to score"),
    data: Optional[str] = typer.Option(None, help="the task's data (as for `fedsplit train --data`)"),
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    server: Optional[str] = typer.Option(None, help="HOST:PORT; omit to run unsplit in this process"),
    adapters: Optional[Path] = typer.Option(
        None, help="run folder from `fedsplit train` (head/ body/ tail/)"
    ),
    head_layers: int = typer.Option(2, help="p (split only)"),
    tail_layers: int = typer.Option(2, help="q (split only)"),
    max_examples: int = typer.Option(200, help="test examples"),
    split_name: str = typer.Option("test", "--split", help="train | val | test"),
    seed: int = typer.Option(0, help="data split seed (use the training seed)"),
    token: Optional[str] = typer.Option(None, envvar="FEDSPLIT_TOKEN", help="bearer token"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the metrics here"),
) -> None:
    """Score the base or a fine-tuned model on a task, split (--server) or centralized."""
    from ..client.train import TrainConfig, build_client, evaluate_client, load_run_adapters
    from ..model.loading import load_tokenizer
    from ..tasks import load_task

    cfg = TrainConfig(
        model=model,
        server=server,
        head_layers=head_layers,
        tail_layers=tail_layers,
        centralized=server is None,
        token=token,
        seed=seed,
    )
    if adapters is not None and server is None:
        cfg.head_layers, cfg.tail_layers, cfg.centralized = head_layers, tail_layers, False
    client = _open(build_client, cfg, None, False)
    if adapters is not None:
        _open(load_run_adapters, client, adapters)
    scored = _open(load_task, task, seed=seed, path=data)
    metrics = evaluate_client(client, scored, load_tokenizer(model), split_name, max_examples)
    _report(metrics, json_out, f"fedsplit eval {task}")


@app.command()
def demo(
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    steps: int = typer.Option(30, help="training steps"),
    batch_size: int = typer.Option(4, help="examples per step"),
    noise: float = typer.Option(
        0.02, help="Gaussian noise std on hidden states sent (relative to each token's RMS)"
    ),
    eval_examples: int = typer.Option(36, help="test examples for accuracy before and after"),
    out: Path = typer.Option(Path("runs/demo"), help="where the demo's adapters go"),
) -> None:
    """The whole system in one go: server, split fine-tuning with noise, accuracy, generation, bytes."""
    from ..bench.demo import run_demo

    _open(run_demo, model, steps, batch_size, noise, eval_examples, out)


def _parse_layers(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        fail(f"--layers takes A:B (e.g. 0:30), not {text!r}")
    return start, end


def _parse_bytes(text: str) -> int:
    units = {
        "": 1,
        "b": 1,
        "kib": 1 << 10,
        "mib": 1 << 20,
        "gib": 1 << 30,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
    }
    t = text.strip().lower()
    number = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(number) :]
    if unit not in units or not number:
        fail(f"cannot read size {text!r}; use e.g. 4GiB or 512MiB")
    return int(float(number) * units[unit])


@app.command()
def serve(
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    layers: Optional[str] = typer.Option(
        None,
        help="decoder layers A:B this server holds (default: all); "
        "any client whose body span lies inside is served",
    ),
    host: str = typer.Option("127.0.0.1", help="bind address (loopback by default)"),
    port: int = typer.Option(7070, help="port; 0 picks a free one"),
    tls_cert: Optional[Path] = typer.Option(None, help="PEM certificate; with --tls-key enables TLS"),
    tls_key: Optional[Path] = typer.Option(None, help="PEM private key"),
    tokens: Optional[Path] = typer.Option(
        None, help="token file (`fedsplit token add`); every call then needs a bearer token"
    ),
    memory_budget: str = typer.Option(
        "4GiB",
        help="memory for session state (KV caches); admission refuses "
        "sessions beyond it with RESOURCE_EXHAUSTED",
    ),
    session_ttl: float = typer.Option(600.0, help="seconds before an abandoned session is freed"),
    graph_ttl: float = typer.Option(300.0, help="seconds a training forward waits for its backward"),
    max_graphs: int = typer.Option(16, help="pending training forwards per session"),
    checkpoint_dir: Optional[Path] = typer.Option(
        None, help="checkpoint training runs (clients' --run-id) here, so they survive a server restart"
    ),
    checkpoint_every: int = typer.Option(
        100, help="checkpoint each run every K optimizer steps (and on SIGTERM)"
    ),
    checkpoint_keep: int = typer.Option(3, help="checkpoints kept per run"),
    mode: str = typer.Option(
        "independent",
        help="training of many clients: independent (a body adapter per "
        "session), sequential, client-batch or server-hierarchical (docs/federation.md)",
    ),
    sync_every: int = typer.Option(0, help="server-hierarchical: average the body replicas every R steps"),
    fedavg_every: int = typer.Option(
        0, help="clients average their head/tail adapters every R steps (0 = never)"
    ),
    round_timeout: float = typer.Option(
        30.0, help="seconds a round waits for missing clients before going on"
    ),
    gather_ms: float = typer.Option(
        250.0,
        help="server-hierarchical: how long a body pass waits for the forwards "
        "of clients about to send one, to run them together (0 = never wait)",
    ),
    threads: int = typer.Option(0, help="compute threads for the body (0: torch's default, one per core)"),
) -> None:
    """Run the body of a split model as a gRPC service (until SIGTERM / Ctrl-C)."""
    import asyncio

    if threads < 0:
        fail("--threads must be >= 0")
    if gather_ms < 0:
        fail("--gather-ms must be >= 0")
    if threads:
        import torch

        torch.set_num_threads(threads)

    from ..server.runner import build_servicer, serve_forever
    from ..server.service import ServerConfig

    if (tls_cert is None) != (tls_key is None):
        fail("TLS needs both --tls-cert and --tls-key")
    config = ServerConfig(
        model=model,
        layers=_parse_layers(layers),
        host=host,
        port=port,
        memory_budget=_parse_bytes(memory_budget),
        session_ttl=session_ttl,
        graph_ttl=graph_ttl,
        max_graphs=max_graphs,
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
        checkpoint_every=checkpoint_every,
        checkpoint_keep=checkpoint_keep,
        mode=mode,
        sync_every=sync_every,
        fedavg_every=fedavg_every,
        round_timeout=round_timeout,
        gather_ms=gather_ms,
    )
    servicer = _open(build_servicer, config, str(tokens) if tokens else None)
    asyncio.run(
        serve_forever(
            servicer, config, str(tls_cert) if tls_cert else None, str(tls_key) if tls_key else None
        )
    )


@token_app.command("add")
def token_add(
    name: str = typer.Argument(..., help="client id"),
    tokens: Path = typer.Option(Path("fedsplit-tokens.txt"), help="token file the server reads"),
) -> None:
    """Create a token for a client; prints it once (only its hash is stored)."""
    from ..server.auth import add_token

    try:
        print(add_token(tokens, name))
    except ValueError as exc:
        fail(str(exc))


from .federation import register as _register_federation  # noqa: E402 - `simulate`, `bench train-modes`

_register_federation(app, bench_app)

if __name__ == "__main__":  # pragma: no cover
    app()
