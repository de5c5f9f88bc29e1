"""The ``fedsplit`` command. Thin: parse options, call the layers.

The apps live in :mod:`fedsplit.cli.app`; each module below adds its commands to them
(``train``/``eval``, ``serve``, the benches and ``demo``/``attack``, ``simulate``). Commands
with a config dataclass take their options from its fields (:mod:`fedsplit.cli.options`).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from ..client.config import GenerateConfig
from .app import MODEL_HELP, app, token_app
from .errors import call, fail
from .options import config_options

__all__ = ["app"]


@app.command()
@config_options(GenerateConfig)
def generate(
    prompt: list[str] = typer.Option(..., "--prompt", help="prompt text; repeat for a batch"),
    local: bool = typer.Option(False, "--local", help="run all three segments in this process"),
    *,
    cfg: GenerateConfig,
) -> None:
    """Generate text with the split model (chat template applied).

    --defense SPEC as for train; unset: the run's own defence and its trained state with --adapters,
    else the default defence. --noise N is a deprecated alias of --defense gaussian:N.
    """
    from ..client.api import SplitModelForCausalLM

    if local == (cfg.server is not None):
        fail("give exactly one of --local or --server HOST:PORT")
    defense = call(cfg.defense_option)
    if cfg.noise > 0:
        logging.getLogger(__name__).warning(
            "--noise is deprecated: use --defense gaussian:%s (same noise)", f"{cfg.noise:g}"
        )
    lm = call(
        SplitModelForCausalLM.from_pretrained,
        cfg.model,
        cfg.server,
        cfg.head_layers,
        cfg.tail_layers,
        cfg.token,
        cfg.tls_ca,
        cfg.wire_dtype,
        defense=defense,
        adapters=cfg.adapters,
        device=cfg.device,
        dtype=cfg.dtype,
        tls_cert=cfg.tls_cert,
        tls_key=cfg.tls_key,
    )
    ids, pad = lm.encode_chat(prompt)
    mask = _mask(ids, pad)
    on_token = None
    if cfg.stream and len(prompt) == 1:

        def on_token(tok):
            sys.stdout.write(lm.tokenizer.decode(tok, skip_special_tokens=True))
            sys.stdout.flush()

    out = lm.generate(
        ids,
        mask,
        max_new_tokens=cfg.max_new_tokens,
        do_sample=cfg.temperature > 0,
        temperature=cfg.temperature or 1.0,
        top_p=cfg.top_p,
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


@token_app.command("revoke")
def token_revoke(
    name: str = typer.Argument(..., help="client id"),
    tokens: Path = typer.Option(Path("fedsplit-tokens.txt"), help="token file the server reads"),
) -> None:
    """Remove a client's token; a running server refuses it from its next call and closes its sessions."""
    from ..server.auth import revoke_token

    try:
        revoke_token(tokens, name)
    except ValueError as exc:
        fail(str(exc))
    print(f"revoked the token of {name} in {tokens}")


# Each adds its commands to the apps; here, so `fedsplit --help` lists them in this order.
from . import train, bench, serve, federation, audit  # noqa: E402, F401, I001

if __name__ == "__main__":  # pragma: no cover
    app()
