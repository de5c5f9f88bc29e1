"""`fedsplit bench memory`: resident memory of each party, each loaded in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

from .config import MemoryBenchConfig

_PROBE = r"""
import gc, json, sys, psutil, torch
from fedsplit.model.loading import load_model
from fedsplit.model.split import load_client_parts, load_part
spec, role, p, q = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
proc = psutil.Process()
before = proc.memory_info().rss
if role == "unsplit":
    parts = [load_model(spec)[0]]
elif role == "server":
    parts = [load_part(spec, "body", p, q)]
else:
    parts = list(load_client_parts(spec, p, q))
gc.collect()
touched = sum(float(x.float().sum()) for m in parts for x in m.parameters())  # page in every weight (mmap)
params = sum(x.numel() for x in {id(x): x for m in parts for x in m.parameters()}.values())
print(json.dumps({"rss": proc.memory_info().rss, "baseline": before, "params": params}))
"""


def run(cfg: MemoryBenchConfig) -> dict:
    """Load the unsplit model, the server's body and the client's head + tail, each in a fresh process."""
    model, head_layers, tail_layers = cfg.model, cfg.head_layers, cfg.tail_layers
    figures: dict = {"model": model, "head_layers": head_layers, "tail_layers": tail_layers}
    for role in ("unsplit", "server", "client"):
        out = subprocess.run(
            [sys.executable, "-c", _PROBE, model, role, str(head_layers), str(tail_layers)],
            capture_output=True,
            text=True,
            check=True,
        )
        probe = json.loads(out.stdout.strip().splitlines()[-1])
        figures[f"{role}_rss_mib"] = probe["rss"] / 2**20
        figures[f"{role}_params_m"] = probe["params"] / 1e6
        figures[f"{role}_weights_mib"] = (probe["rss"] - probe["baseline"]) / 2**20
    return figures
