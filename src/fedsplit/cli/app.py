"""The Typer apps every command module adds its commands to (``fedsplit``, ``fedsplit bench``, ``fedsplit token``)."""

from __future__ import annotations

import logging
import sys

import typer

from ..client import config as client_config
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

MODEL_HELP = client_config.MODEL_HELP  # for the options of commands without a config dataclass


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
