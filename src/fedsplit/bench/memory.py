"""`fedsplit bench memory`: resident memory of each party, each loaded in a fresh process.

Each party (the unsplit model, the server's body, the client's head + tail) is loaded on
``--device`` in ``--dtype`` in a process of its own, so one's memory never counts for another.
Reported per party: RSS (MiB and GiB), parameters, the RSS the weights added and, on CUDA,
``torch.cuda.max_memory_allocated`` (the GPU memory its weights took).
"""

from __future__ import annotations

import json
import subprocess
import sys

from .config import MemoryBenchConfig

_PROBE = r"""
import gc, json, sys, psutil, torch
from fedsplit.model.device import resolve_device, resolve_dtype
from fedsplit.model.loading import load_model
from fedsplit.model.split import load_client_parts, load_part
spec, role, p, q = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
device = resolve_device(sys.argv[5])
dtype = resolve_dtype(sys.argv[6], device)
proc = psutil.Process()
before = proc.memory_info().rss
if role == "unsplit":
    parts = [load_model(spec, dtype=dtype)[0].to(device)]
elif role == "server":
    parts = [load_part(spec, "body", p, q, dtype=dtype, device=device)]
else:
    parts = list(load_client_parts(spec, p, q, dtype=dtype, device=device))
gc.collect()
touched = sum(float(x.float().sum()) for m in parts for x in m.parameters())  # page in every weight (mmap)
params = sum(x.numel() for x in {id(x): x for m in parts for x in m.parameters()}.values())
cuda = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
print(json.dumps({"rss": proc.memory_info().rss, "baseline": before, "params": params, "cuda": cuda}))
"""


def run(cfg: MemoryBenchConfig) -> dict:
    """Load the unsplit model, the server's body and the client's head + tail, each in a fresh process."""
    from ..model.device import resolve_device, resolve_dtype
    from .procs import placement_figures

    model, head_layers, tail_layers = cfg.model, cfg.head_layers, cfg.tail_layers
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    placed = placement_figures(device, dtype)
    figures: dict = {"model": model, "head_layers": head_layers, "tail_layers": tail_layers, **placed}
    where = [placed["device"], placed["dtype"]]
    for role in ("unsplit", "server", "client"):
        out = subprocess.run(
            [sys.executable, "-c", _PROBE, model, role, str(head_layers), str(tail_layers), *where],
            capture_output=True,
            text=True,
            check=True,
        )
        probe = json.loads(out.stdout.strip().splitlines()[-1])
        figures[f"{role}_rss_mib"] = probe["rss"] / 2**20
        figures[f"{role}_params_m"] = probe["params"] / 1e6
        figures[f"{role}_weights_mib"] = (probe["rss"] - probe["baseline"]) / 2**20
        figures[f"{role}_gib"] = probe["rss"] / 2**30
        if probe["cuda"] is not None:
            figures[f"{role}_cuda_max_allocated_gib"] = probe["cuda"] / 2**30
    return figures
