"""The ``fedsplit`` command. Thin: parse options, call the layers."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated split learning and inference of LLMs.")
token_app = typer.Typer(no_args_is_help=True, help="Manage client tokens for `fedsplit serve --tokens`.")
bench_app = typer.Typer(no_args_is_help=True, help="Reproducible measurements (ratios measured side by side).")
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
    adapters: Optional[Path] = typer.Option(None, help="directory with head/ and tail/ adapters from fedsplit train"),
    noise: float = typer.Option(0.0, help="Gaussian noise std on hidden states sent"),
) -> None:
    """Generate text with the split model (chat template applied)."""
    from ..client.api import SplitModelForCausalLM

    if local == (server is not None):
        fail("give exactly one of --local or --server HOST:PORT")
    defense = _defense(noise, False)
    lm = _open(SplitModelForCausalLM.from_pretrained, model, server, head_layers, tail_layers, token, tls_ca,
               wire_dtype, defense, adapters)
    ids, pad = lm.encode_chat(prompt)
    mask = _mask(ids, pad)
    on_token = None
    if stream and len(prompt) == 1:
        def on_token(tok):
            sys.stdout.write(lm.tokenizer.decode(tok, skip_special_tokens=True))
            sys.stdout.flush()
    out = lm.generate(ids, mask, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                      temperature=temperature or 1.0, top_p=top_p, on_token=on_token)
    if on_token is not None:
        print()
        return
    for row in out:
        print(lm.tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True).strip())


def _mask(ids, pad):
    import torch

    return (torch.arange(ids.shape[1])[None] >= pad[:, None]).long()


def _defense(noise: float, relative: bool):
    if noise <= 0:
        return None
    from ..privacy import parse_defense

    return parse_defense(f"gaussian:{noise}" + (":relative" if relative else ""))


def _open(factory, *args):
    from ..model.loading import ModelSpecError, UnsupportedModelError

    try:
        return factory(*args)
    except (ModelSpecError, UnsupportedModelError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    except ConnectionError as exc:
        fail(str(exc))


@app.command()
def export(
    adapters: Path = typer.Option(..., help="directory with head/, body/ and tail/ adapters"),
    out: Path = typer.Option(..., help="output directory for the merged adapter"),
    model: Optional[str] = typer.Option(None, help=f"{MODEL_HELP}; with --merged, also write a merged model"),
    merged: bool = typer.Option(False, "--merged", help="also write the base model with the adapter merged in"),
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


def _parse_layers(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        fail(f"--layers takes A:B (e.g. 0:30), not {text!r}")
    return start, end


def _parse_bytes(text: str) -> int:
    units = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    t = text.strip().lower()
    number = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(number):]
    if unit not in units or not number:
        fail(f"cannot read size {text!r}; use e.g. 4GiB or 512MiB")
    return int(float(number) * units[unit])


@app.command()
def serve(
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    layers: Optional[str] = typer.Option(None, help="decoder layers A:B this server holds (default: all); "
                                         "any client whose body span lies inside is served"),
    host: str = typer.Option("127.0.0.1", help="bind address (loopback by default)"),
    port: int = typer.Option(7070, help="port; 0 picks a free one"),
    tls_cert: Optional[Path] = typer.Option(None, help="PEM certificate; with --tls-key enables TLS"),
    tls_key: Optional[Path] = typer.Option(None, help="PEM private key"),
    tokens: Optional[Path] = typer.Option(None, help="token file (`fedsplit token add`); every call then needs a "
                                          "bearer token"),
    memory_budget: str = typer.Option("4GiB", help="memory for session state (KV caches); admission refuses "
                                      "sessions beyond it with RESOURCE_EXHAUSTED"),
    session_ttl: float = typer.Option(600.0, help="seconds before an abandoned session is freed"),
    graph_ttl: float = typer.Option(300.0, help="seconds a training forward waits for its backward"),
    max_graphs: int = typer.Option(16, help="pending training forwards per session"),
) -> None:
    """Run the body of a split model as a gRPC service (until SIGTERM / Ctrl-C)."""
    import asyncio

    from ..server.runner import build_servicer, serve_forever
    from ..server.service import ServerConfig

    if (tls_cert is None) != (tls_key is None):
        fail("TLS needs both --tls-cert and --tls-key")
    config = ServerConfig(
        model=model, layers=_parse_layers(layers), host=host, port=port, memory_budget=_parse_bytes(memory_budget),
        session_ttl=session_ttl, graph_ttl=graph_ttl, max_graphs=max_graphs,
    )
    servicer = _open(build_servicer, config, str(tokens) if tokens else None)
    asyncio.run(serve_forever(servicer, config, str(tls_cert) if tls_cert else None,
                              str(tls_key) if tls_key else None))


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


if __name__ == "__main__":  # pragma: no cover
    app()
