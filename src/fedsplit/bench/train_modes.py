"""`fedsplit bench train-modes`: sequential vs client-batch vs server-hierarchical, side by side.

One run: the same client processes, the same data and the same total examples for
every mode, at each round-trip time. Besides the wall times and the speedups it reports
the bound this machine allows. Every party shares the machine's cores, so no mode can
finish faster than the *pure compute* of the work — the same client steps (head, body and
tail forward and backward, optimiser steps) with no network and no serialisation,
in one process or spread over one process per core, whichever is faster, measured in the
same run. The bound on a mode's speedup over sequential is therefore
``sequential time / pure compute time``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

from .config import TrainModesConfig
from .report import write_report
from .simulate import GlobalModel, SimulateConfig, run_job
from .workers import ClientPool

log = logging.getLogger(__name__)

PARALLEL = ("client-batch", "server-hierarchical")
MODES = ("sequential", *PARALLEL)
SHORT = {"sequential": "seq", "client-batch": "cb", "server-hierarchical": "sh"}


class _ComputeShare:
    """The client steps of some clients, in one process, without network or serialisation."""

    def __init__(self, cfg: SimulateConfig, clients: list[int]) -> None:
        from ..client.core import LocalTransport, SplitClient
        from ..model.loading import load_config, load_tokenizer
        from ..model.lora import LoraSettings, add_lora
        from ..model.split import body_span, load_part, num_layers
        from ..tasks import iterate_batches, load_task, partition
        from ..wire.protocol import SessionConfig

        p, q = cfg.head_layers[0], cfg.tail_layers[0]
        lora = LoraSettings(rank=cfg.rank, alpha=cfg.alpha)
        tokenizer = load_tokenizer(cfg.model)
        task = load_task(cfg.task, max_examples=cfg.max_examples, seed=cfg.seed)
        parts = partition(task.train, cfg.clients, cfg.partition, seed=cfg.seed)
        span = body_span(num_layers(load_config(cfg.model)), p, q)
        place = {"dtype": cfg.dtype, "device": cfg.device}  # where the clients and the server compute
        head, tail = load_part(cfg.model, "head", p, q, **place), load_part(cfg.model, "tail", p, q, **place)
        add_lora(head, lora, seed=cfg.seed)
        add_lora(tail, lora, seed=cfg.seed)
        body = load_part(cfg.model, "body", span=span, **place)
        self.client = SplitClient(head, tail, LocalTransport(body), span)
        self.client.start_training(
            SessionConfig(
                span=span,
                mode="train",
                max_length=cfg.max_length,
                max_batch=cfg.batch_size,
                lora=lora,
                lr=cfg.lr,
                seed=cfg.seed,
            ),
            lr=cfg.lr,
        )
        self.batches = []
        for i in clients:  # the same batches the client processes train on
            stream = iterate_batches(
                parts[i], tokenizer, cfg.batch_size, seed=cfg.seed + 1009 * (i + 1), max_length=cfg.max_length
            )
            self.batches.append([next(stream) for _ in range(cfg.steps)])
        self.steps = cfg.steps
        self.client.train_step(self.batches[0][0])  # warm-up, not timed

    def run(self) -> float:
        started = time.perf_counter()
        for step in range(self.steps):
            for batches in self.batches:
                self.client.train_step(batches[step])
        return time.perf_counter() - started


def _compute_worker(cfg_json: str, clients: list[int], events, start) -> None:
    import json

    import torch

    torch.set_num_threads(1)
    raw = json.loads(cfg_json)
    cfg = SimulateConfig(
        **{**raw, "head_layers": tuple(raw["head_layers"]), "tail_layers": tuple(raw["tail_layers"])}
    )
    try:
        share = _ComputeShare(cfg, clients)
        events.put(json.dumps({"event": "ready"}))
        start.wait(timeout=600)
        share.run()
        events.put(json.dumps({"event": "done", "end": time.time()}))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        events.put(json.dumps({"event": "error", "error": repr(exc)}))


def measure_compute(cfg: SimulateConfig, processes: int | None = None) -> dict:
    """The pure compute time of the runs' client steps on this machine.

    Measured twice in the same run: all the steps in this process on one thread, and the
    steps split over one single-threaded process per core running at once. The faster
    counts — no mode can do the same work faster (on a machine shared with other work the
    parallel split may gain nothing). One thread per process because several threads
    sharing busy cores mostly spin-wait for each other.
    """
    import json
    import multiprocessing as mp
    import os

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = _ComputeShare(cfg, list(range(cfg.clients))).run()
    finally:
        torch.set_num_threads(threads)
    k = max(1, min(processes or os.cpu_count() or 1, cfg.clients))
    ctx = mp.get_context("spawn")
    events, start = ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(
            target=_compute_worker,
            daemon=True,
            args=(json.dumps(asdict(cfg)), list(range(j, cfg.clients, k)), events, start),
        )
        for j in range(k)
    ]
    for proc in procs:
        proc.start()
    try:
        messages = [json.loads(events.get(timeout=900)) for _ in procs]
        if any(m["event"] != "ready" for m in messages):
            raise RuntimeError(f"compute measurement failed: {messages}")
        started = time.time()
        start.set()
        messages = [json.loads(events.get(timeout=3600)) for _ in procs]
        if any(m["event"] != "done" for m in messages):
            raise RuntimeError(f"compute measurement failed: {messages}")
        parallel = max(m["end"] for m in messages) - started
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
    return {
        "compute_s": min(serial, parallel),
        "compute_serial_s": serial,
        f"compute_{k}_processes_s": parallel,
        "compute_ms_per_client_step": 1000 * serial / (cfg.clients * cfg.steps),
    }


def machine_cpu(stat: str | None = None) -> dict[str, float] | None:
    """The machine's CPU seconds so far, from ``/proc/stat`` (None where there is none).

    ``busy`` counts user, nice, system and interrupt time; ``steal`` the time the
    hypervisor gave this VM's cores to someone else. A run that is slow because the host
    is busy shows it as steal, or as fewer busy cores than the run had work for.
    """
    import os

    if stat is None:
        try:
            with open("/proc/stat") as f:
                stat = f.read()
        except OSError:
            return None
    fields = next((line.split() for line in stat.splitlines() if line.startswith("cpu ")), None)
    if fields is None:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in (fields[1:] + ["0"] * 8)[:8])
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return {
        "busy": (user + nice + system + irq + softirq) / hz,
        "idle": (idle + iowait) / hz,
        "steal": steal / hz,
    }


def cpu_between(before: dict | None, after: dict | None, seconds: float) -> dict[str, float]:
    """Average busy cores and steal (seconds and cores) over a span of ``seconds``."""
    import os

    if before is None or after is None or seconds <= 0:
        return {}
    return {
        "busy_cores": (after["busy"] - before["busy"]) / seconds,
        "steal_s": after["steal"] - before["steal"],
        "steal_cores": (after["steal"] - before["steal"]) / seconds,
        "cores": os.cpu_count() or 1,
    }


def body_lrs(sim: SimulateConfig, scale: str) -> dict[str, float]:
    """The body learning rate of every mode; client-batch and server-hierarchical under ``scale``.

    Sequential takes one body step per client step; client-batch one per round, on the
    union of the clients' batches; server-hierarchical one per replica, averaged over the
    clients. At one learning rate the parallel modes move the body about ``clients`` times
    less for the same examples; ``linear`` (the linear scaling rule for an N-times larger
    batch) makes up for it, ``sqrt`` (the square-root rule usually given for Adam) partly.
    """
    base = sim.lr if sim.body_lr is None else sim.body_lr
    factors = {"none": 1.0, "sqrt": sim.clients**0.5, "linear": float(sim.clients)}
    if scale not in factors:
        raise ValueError(f"body lr scale must be one of {', '.join(factors)}, not {scale!r}")
    return {mode: base * factors[scale] if mode in PARALLEL else base for mode in MODES}


def summarise(runs: list[dict], compute_seconds: float) -> list[dict]:
    """Per RTT: median wall time per mode, speedups over sequential, the bound and the fraction of it."""
    import statistics

    rows = []
    for rtt in sorted({r["rtt_ms"] for r in runs}):
        own = {m: [r for r in runs if r["rtt_ms"] == rtt and r["mode"] == m] for m in MODES}
        walls = {m: [r["wall_seconds"] for r in rs] for m, rs in own.items()}
        wall = {m: statistics.median(w) for m, w in walls.items() if w}
        row = {"rtt_ms": rtt, **{f"{SHORT[m]}_s": wall[m] for m in MODES if m in wall}}
        if any(len(w) > 1 for w in walls.values()):
            row["runs_s"] = {SHORT[m]: w for m, w in walls.items()}
        # busy cores and steal per run, in the order of runs_s: they tell a slow spell
        measured = {m: rs for m, rs in own.items() if rs and all(r.get("machine") for r in rs)}
        if measured:
            for key in ("busy_cores", "steal_s"):
                row[key] = {SHORT[m]: [r["machine"][key] for r in rs] for m, rs in measured.items()}
        seq = wall.get("sequential")
        bound = seq / compute_seconds if seq else None
        row["bound"] = bound
        for mode in PARALLEL:
            if seq and mode in wall:
                speedup = seq / wall[mode]
                row[f"speedup_{SHORT[mode]}"] = speedup
                row[f"{SHORT[mode]}_of_bound"] = speedup / bound
            if mode in measured:
                # Stolen CPU seconds held up a run by at least steal / cores (all cores busy);
                # the pure compute, measured once, is compared with the wall time less that.
                unstolen = statistics.median(
                    r["wall_seconds"] - r["machine"]["steal_s"] / r["machine"]["cores"]
                    for r in measured[mode]
                )
                row[f"{SHORT[mode]}_of_bound_less_steal"] = compute_seconds / unstolen
        rows.append(row)
    return rows


def run_train_modes(cfg: TrainModesConfig, progress: bool = True) -> dict:
    """Measure every mode at every RTT with one pool of client processes; write the report.

    One server per mode runs for the whole benchmark (a server starts a new federation
    whenever the last client of the previous run has left), so a run costs only its
    training. Modes take turns at each RTT, in a rotated order on each repeat, so a change
    in the machine's load hits them alike.
    """
    from ..tasks import load_task
    from .simulate import federation_server

    cfg = cfg.resolved()
    sim = cfg.simulate_config()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for mode in MODES:
        replace(sim, mode=mode).check()
    body_lr = body_lrs(sim, cfg.body_lr_scale)
    started = time.perf_counter()
    runs: list[dict] = []
    with ClientPool(sim.specs(), wait=False) as pool, contextlib.ExitStack() as servers:
        address = {
            mode: servers.enter_context(
                federation_server(replace(sim, mode=mode), out / f"server-{mode}.log")
            )
            for mode in MODES
        }
        pool.wait_loaded()
        log.info("measuring the pure compute of %d x %d client steps", sim.clients, sim.steps)
        before, t0 = machine_cpu(), time.perf_counter()
        measured = measure_compute(sim)
        measured["compute_machine"] = cpu_between(before, machine_cpu(), time.perf_counter() - t0)
        log.info("pure compute: %s", measured)
        for repeat in range(cfg.repeats):
            order = MODES[repeat % len(MODES) :] + MODES[: repeat % len(MODES)]
            for rtt in cfg.rtt_ms:
                for mode in order:
                    name = f"{mode}@{rtt:g}ms" + (f"#{repeat + 1}" if cfg.repeats > 1 else "")
                    before, t0 = machine_cpu(), time.perf_counter()
                    run = run_job(
                        pool,
                        replace(sim, mode=mode, rtt_ms=rtt, body_lr=body_lr[mode]),
                        out,
                        name,
                        progress,
                        save_dir=out / "adapters" / name,
                        server=address[mode],
                    )
                    run["repeat"] = repeat
                    run["machine"] = cpu_between(before, machine_cpu(), time.perf_counter() - t0)
                    log.info("%s: %.1fs %s", name, run["wall_seconds"], _machine_text(run["machine"]))
                    runs.append(run)
    accuracy = {}
    if cfg.eval_examples > 0:
        task = load_task(sim.task, max_examples=sim.max_examples, seed=sim.seed)
        model = GlobalModel(
            sim.model, sim.head_layers[0], sim.tail_layers[0], sim.rank, sim.alpha, sim.device, sim.dtype
        )
        for run in runs:
            if run["rtt_ms"] == cfg.rtt_ms[0] and run["repeat"] == 0:
                model.load(out / "adapters" / run["name"])
                run["eval"] = model.evaluate(task, cfg.eval_examples)
                accuracy[run["mode"]] = run["eval"]
    table = summarise(runs, measured["compute_s"])
    figures = {
        "model": sim.model,
        "clients": sim.clients,
        "steps_per_client": sim.steps,
        "batch_size": sim.batch_size,
        "max_length": sim.max_length,
        "examples_per_mode": sim.clients * sim.steps * sim.batch_size,
        "repeats": cfg.repeats,
        "lr": sim.lr,
        "body_lr": body_lr,
        **measured,
        "rows": table,
        "eval": accuracy,
        "total_seconds": time.perf_counter() - started,
    }
    report = {"config": {"simulate": asdict(sim), "bench": asdict(cfg)}, "runs": runs, "figures": figures}
    write_report(report, out, f"fedsplit bench train-modes: {sim.model}, {sim.clients} clients")
    plot_wall_times(table, out / "wall.png")
    return figures


def _machine_text(machine: dict) -> str:
    if not machine:
        return ""
    return f"({machine['busy_cores']:.2f} cores busy, steal {machine['steal_s']:.1f}s)"


def plot_wall_times(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.25
    for k, mode in enumerate(MODES):
        xs = [i + (k - 1) * width for i in range(len(table))]
        ax.bar(xs, [row.get(f"{SHORT[mode]}_s", 0) for row in table], width, label=mode)
    ax.set_xticks(range(len(table)), [f"{row['rtt_ms']:g} ms" for row in table])
    ax.set_xlabel("round-trip time")
    ax.set_ylabel("wall time (s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
