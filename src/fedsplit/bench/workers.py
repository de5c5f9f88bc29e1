"""Client processes for simulations: each loads its head, tail and data partition once, then runs jobs.

A job is one training run against one server address. Loading (imports, weights,
tokenising) happens before the start signal, so the wall time of a run measures
training only, and a benchmark can run several modes with the same processes. Messages
between the processes are JSON strings; adapters are handed over as safetensors files.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class ClientSpec:
    """What one client process holds: its partition of the data and its head/tail split."""

    index: int
    n_clients: int
    model: str
    task: str = "sentiment"
    partition: str = "iid"
    head_layers: int = 2
    tail_layers: int = 2
    batch_size: int = 8
    max_length: int = 128
    max_examples: int | None = None
    lr: float = 2e-4
    rank: int = 8
    alpha: float = 16.0
    seed: int = 0
    wire_dtype: str = "fp16"
    threads: int = 1
    token: str | None = None
    device: str = "auto"  # where head and tail compute, and in which dtype
    dtype: str = "auto"


@dataclass
class Job:
    """One training run of every client against ``address``."""

    address: str
    steps: int
    save_dir: str | None = None  # client 0 saves the global adapters here (head/, body/, tail/)
    name: str = "run"
    body_lr: float | None = None  # the body LoRA's learning rate for this run (default: the spec's lr)
    body_warmup: int = 0  # optimiser steps over which the body lr ramps up (0 = constant)
    extra: dict = field(default_factory=dict)


class _Client:
    """Runs inside a client process."""

    def __init__(self, spec: ClientSpec) -> None:
        import torch

        from ..client.core import SplitClient
        from ..model.loading import load_config, load_tokenizer, model_fingerprint
        from ..model.lora import LoraSettings, add_lora, lora_state_dict
        from ..model.split import body_span, load_part, num_layers
        from ..tasks import label_histogram, load_task, partition

        torch.set_num_threads(spec.threads)
        self.spec = spec
        self.lora = LoraSettings(rank=spec.rank, alpha=spec.alpha)
        self.tokenizer = load_tokenizer(spec.model)
        task = load_task(spec.task, max_examples=spec.max_examples, seed=spec.seed)
        self.part = partition(task.train, spec.n_clients, spec.partition, seed=spec.seed)[spec.index]
        p, q = spec.head_layers, spec.tail_layers
        self.span = body_span(num_layers(load_config(spec.model)), p, q)
        place = {"dtype": spec.dtype, "device": spec.device}
        head, tail = (
            load_part(spec.model, "head", p, q, **place),
            load_part(spec.model, "tail", p, q, **place),
        )
        add_lora(head, self.lora, seed=spec.seed)  # one seed for everyone: FedAvg from a common start
        add_lora(tail, self.lora, seed=spec.seed)
        self.initial = (lora_state_dict(head), lora_state_dict(tail))
        self.client = SplitClient(head, tail, None, self.span)
        self.fingerprint = model_fingerprint(spec.model)
        labels = (
            label_histogram([self.part], len(task.label_words or [])).tolist()[0] if task.label_words else []
        )
        self.summary = {"examples": len(self.part), "labels": labels, "span": list(self.span)}

    def run(self, job: Job, events, start) -> dict:
        from ..client.federated import MODE_NAMES, FederatedTransport, train_federated
        from ..model.lora import load_lora_state_dict
        from ..tasks import iterate_batches
        from ..wire.protocol import SessionConfig

        spec, client = self.spec, self.client
        load_lora_state_dict(client.head, self.initial[0])
        load_lora_state_dict(client.tail, self.initial[1])
        stream = iterate_batches(
            self.part,
            self.tokenizer,
            spec.batch_size,
            seed=spec.seed + 1009 * (spec.index + 1),
            max_length=spec.max_length,
        )
        batches = [next(stream) for _ in range(job.steps)]  # tokenised before the clock starts
        transport = FederatedTransport(
            job.address,
            token=spec.token,
            wire_dtype=spec.wire_dtype,
            fingerprint=self.fingerprint,
            retries=8,
            backoff=0.25,
        )
        info = transport.info()
        client.transport = transport
        client.start_training(
            SessionConfig(
                span=self.span,
                mode="train",
                max_length=spec.max_length,
                max_batch=spec.batch_size,
                lora=self.lora,
                lr=spec.lr if job.body_lr is None else job.body_lr,
                warmup_steps=job.body_warmup,
                seed=spec.seed,
            ),
            lr=spec.lr,
        )
        events.put(json.dumps({"event": "ready", "client": spec.index}))
        if not start.wait(timeout=600):
            raise TimeoutError("no start signal within 600 s")
        transport.traffic.reset()

        def on_step(step: int, loss: float) -> None:
            events.put(
                json.dumps(
                    {"event": "step", "client": spec.index, "step": step, "loss": loss, "time": time.time()}
                )
            )

        result = train_federated(
            client, transport, batches, job.steps, int(info.fedavg_every), f"client{spec.index}", on_step
        )
        result.update(
            client=spec.index,
            bytes_sent=transport.traffic.sent,
            bytes_received=transport.traffic.received,
            mode=MODE_NAMES.get(info.federation_mode, "?"),
            **self.summary,
        )
        if job.save_dir and spec.index == 0:
            self._save(Path(job.save_dir))
        client.train_session.close()
        transport.close()
        return result

    def _save(self, out: Path) -> None:
        from ..model.lora import save_adapter

        meta = {
            "model": self.spec.model,
            "head_layers": self.spec.head_layers,
            "tail_layers": self.spec.tail_layers,
        }
        save_adapter(self.client.head, out / "head", self.lora, **meta)
        save_adapter(self.client.tail, out / "tail", self.lora, **meta)
        from ..server.coordination.fedavg import restrict

        settings, state = self.client.train_session.adapter_state()
        # The server's adapter covers every layer it holds; the global body is this client's span of it.
        save_adapter(None, out / "body", settings, state=restrict(state, self.span), **meta)


def _exit_with_parent(parent: int, every: float = 1.0) -> None:
    """Watch the parent from a daemon thread; leave at once if it is gone (killed outright).

    A parent that exits normally closes the pool; one killed by SIGKILL cannot, and its
    workers would wait on their command queues forever.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="fedsplit-parent-watch", daemon=True).start()


def _worker_main(spec_json: str, commands, events, start, parent: int | None = None) -> None:
    if parent is not None:
        _exit_with_parent(parent)
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format=f"%(asctime)s client{json.loads(spec_json)['index']} %(levelname)s %(name)s: %(message)s",
    )
    spec = ClientSpec(**json.loads(spec_json))
    try:
        worker = _Client(spec)
    except Exception:  # noqa: BLE001 - reported to the parent
        events.put(json.dumps({"event": "error", "client": spec.index, "error": traceback.format_exc()}))
        return
    events.put(json.dumps({"event": "loaded", "client": spec.index, **worker.summary}))
    for message in iter(commands.get, None):
        try:
            result = worker.run(Job(**json.loads(message)), events, start)
            events.put(json.dumps({"event": "done", **result}))
        except Exception:  # noqa: BLE001 - reported to the parent
            events.put(json.dumps({"event": "error", "client": spec.index, "error": traceback.format_exc()}))


class WorkerError(RuntimeError):
    pass


class ClientPool:
    """N client processes (spawned), reused across jobs; ``run(job)`` trains all of them once."""

    def __init__(self, specs: list[ClientSpec], load_timeout: float = 900.0, wait: bool = True) -> None:
        ctx = mp.get_context("spawn")
        self.specs = specs
        self.events = ctx.Queue()
        self.start = ctx.Event()
        self.commands = [ctx.Queue() for _ in specs]
        env_threads = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"  # children inherit it: no oversubscription of the cores
        try:
            self.procs = [
                ctx.Process(
                    target=_worker_main,
                    args=(json.dumps(asdict(s)), q, self.events, self.start, os.getpid()),
                    name=f"fedsplit-client{s.index}",
                    daemon=True,
                )
                for s, q in zip(specs, self.commands)
            ]
            for proc in self.procs:
                proc.start()
        finally:
            if env_threads is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = env_threads
        self.summaries: dict[int, dict] = {}
        self.load_timeout = load_timeout
        if wait:
            self.wait_loaded()

    def wait_loaded(self) -> None:
        """Block until every client process has loaded its model parts and data (start a server meanwhile)."""
        if len(self.summaries) < len(self.specs):
            self._collect("loaded", self.load_timeout, lambda e: self.summaries.__setitem__(e["client"], e))

    def _next_event(self, deadline: float) -> dict:
        while True:
            try:
                return json.loads(self.events.get(timeout=1.0))
            except queue.Empty:
                dead = [p.name for p in self.procs if not p.is_alive()]
                if dead:
                    raise WorkerError(f"client process(es) died: {', '.join(dead)}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError("client processes did not answer in time") from None

    def _collect(self, kind: str, timeout: float, on_event, on_other=None) -> None:
        seen: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(seen) < len(self.specs):
            event = self._next_event(deadline)
            if event["event"] == "error":
                raise WorkerError(f"client {event['client']} failed:\n{event['error']}")
            if event["event"] == kind:
                seen.add(event["client"])
                on_event(event)
            elif on_other is not None:
                on_other(event)

    def run(self, job: Job, on_step=None, timeout: float = 3600.0) -> tuple[float, list[dict]]:
        """Train every client once; returns (the start time, per-client results)."""
        self.start.clear()
        for q in self.commands:
            q.put(json.dumps(asdict(job)))
        self._collect("ready", 600.0, lambda e: None)
        started = time.time()
        self.start.set()
        results: dict[int, dict] = {}
        self._collect(
            "done",
            timeout,
            lambda e: results.__setitem__(e["client"], e),
            on_other=lambda e: on_step(e) if on_step and e["event"] == "step" else None,
        )
        return started, [results[i] for i in sorted(results)]

    def close(self) -> None:
        for q in self.commands:
            q.put(None)
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
