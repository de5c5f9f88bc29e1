"""`fedsplit bench load`: many generation and training clients against one server process.

The server runs as ``fedsplit serve`` in a child process (its resident memory is sampled
with psutil); the clients are threads of this process, each with its own gRPC channel
and session — generation clients share one read-only head and tail, training clients
each hold their own head/tail LoRA. Every client loops until the time is up: a
generation client generates ``new_tokens`` tokens from a random prompt, closes, opens
again; a training client runs optimiser steps on random batches. Reported: per-token
and per-step latency (p50/p99, as the client sees it), throughput, errors (every
exception a client saw; the target is 0) and the server's peak RSS next to its
configured memory budget (which bounds session state, not the model weights).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import psutil
import torch

from ..client.core import SplitClient
from ..client.remote import RemoteTransport
from ..model.loading import load_config, model_fingerprint
from ..model.lora import LoraSettings, add_lora
from ..model.split import body_span, load_client_parts, num_layers
from ..wire.protocol import SessionConfig
from .config import LoadBenchConfig
from .procs import placement_args, server_process

log = logging.getLogger(__name__)


@dataclass
class Tally:
    """What the client threads record (appends are atomic under the GIL)."""

    token_latency: list[float] = field(default_factory=list)  # decode step: one token, client round trip
    prefill_latency: list[float] = field(default_factory=list)
    step_latency: list[float] = field(default_factory=list)  # one whole training step
    tokens: int = 0
    generations: int = 0
    steps: int = 0
    examples: int = 0
    errors: list[str] = field(default_factory=list)


class _TimedSession:
    """Times each forward of a generation session (prefill and decode steps apart)."""

    def __init__(self, session, tally: Tally) -> None:
        self.session, self.tally = session, tally

    def forward(self, step_id, hidden, pad_lengths, offset=0, **kwargs):
        start = time.perf_counter()
        out = self.session.forward(step_id, hidden, pad_lengths, offset, **kwargs)
        (self.tally.token_latency if hidden.shape[1] == 1 else self.tally.prefill_latency).append(
            time.perf_counter() - start
        )
        return out

    def close(self) -> None:
        self.session.close()


def _gen_client(address, fingerprint, head, tail, span, cfg, tally, deadline, seed):
    transport = RemoteTransport(address, wire_dtype=cfg.wire_dtype, fingerprint=fingerprint, retries=2)
    client = SplitClient(head, tail, transport, span)
    gen = torch.Generator().manual_seed(seed)
    vocab = int(head.config.vocab_size)
    try:
        while time.monotonic() < deadline:
            ids = torch.randint(10, vocab, (1, cfg.prompt_tokens), generator=gen)
            try:
                session = _TimedSession(
                    transport.open(
                        SessionConfig(
                            span=span,
                            mode="generate",
                            max_length=cfg.prompt_tokens + cfg.new_tokens,
                            max_batch=1,
                        )
                    ),
                    tally,
                )
                try:
                    out = client.generate(ids, max_new_tokens=cfg.new_tokens, session=session)
                finally:
                    session.close()
                tally.tokens += int(out.shape[1])
                tally.generations += 1
            except Exception as exc:  # counted, then the client carries on
                tally.errors.append(f"generate: {exc}")
                time.sleep(0.5)
    finally:
        transport.close()


def _train_client(address, fingerprint, head, tail, span, cfg, tally, deadline, seed):
    torch.manual_seed(seed)
    lora = LoraSettings(rank=8, alpha=16.0)
    head, tail = copy.deepcopy(head), copy.deepcopy(tail)
    if getattr(head.config, "tie_word_embeddings", False):
        tail.lm_head.weight = head.embed_tokens.weight
    add_lora(head, lora, seed=seed)
    add_lora(tail, lora, seed=seed)
    transport = RemoteTransport(address, wire_dtype=cfg.wire_dtype, fingerprint=fingerprint, retries=2)
    client = SplitClient(head, tail, transport, span)
    batch, length = cfg.train_batch, cfg.train_length
    gen = torch.Generator().manual_seed(seed)
    vocab = int(head.config.vocab_size)
    labelled = min(16, length - 1)  # an answer at the end of each example, as in instruction tuning
    try:
        client.start_training(
            SessionConfig(span=span, mode="train", max_length=length, max_batch=batch, lora=lora, seed=seed),
            lr=1e-4,
        )
        while time.monotonic() < deadline:
            ids = torch.randint(10, vocab, (batch, length), generator=gen)
            labels = ids.clone()
            labels[:, : length - labelled] = -100
            data = {"input_ids": ids, "labels": labels, "pad_lengths": torch.zeros(batch, dtype=torch.long)}
            start = time.perf_counter()
            try:
                client.train_step(data)
            except Exception as exc:
                tally.errors.append(f"train: {exc}")
                time.sleep(0.5)
                continue
            tally.step_latency.append(time.perf_counter() - start)
            tally.steps += 1
            tally.examples += batch
    except Exception as exc:
        tally.errors.append(f"train open: {exc}")
    finally:
        if client.train_session is not None:
            client.train_session.close()
        transport.close()


class _RssSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.25) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.process, self.every = psutil.Process(pid), every
        self.peak = self.first = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                rss = self.process.memory_info().rss
            except psutil.Error:
                return
            self.first = self.first or rss
            self.peak = max(self.peak, rss)
            self.stop.wait(self.every)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def run(cfg: LoadBenchConfig) -> dict:
    """Run the load and return one flat dict of figures (latencies in ms, memory in MiB)."""
    model, head_layers, tail_layers, wire_dtype = cfg.model, cfg.head_layers, cfg.tail_layers, cfg.wire_dtype
    gen_clients, train_clients, seconds = cfg.gen_clients, cfg.train_clients, cfg.seconds
    torch.set_num_threads(cfg.client_threads)  # the clients share the machine with the server
    n = num_layers(load_config(model))
    span = body_span(n, head_layers, tail_layers)
    head, tail = load_client_parts(model, head_layers, tail_layers, dtype=cfg.dtype, device=cfg.device)
    for module in (head, tail):
        module.eval().requires_grad_(False)
    fingerprint = model_fingerprint(model)
    serve_args = ("--memory-budget", str(cfg.memory_budget), *placement_args(cfg.device, cfg.dtype))
    with server_process(model, *serve_args) as (address, proc):
        sampler = _RssSampler(proc.pid)
        sampler.start()
        idle_rss = psutil.Process(proc.pid).memory_info().rss
        tally = Tally()
        deadline = time.monotonic() + seconds
        threads = [
            threading.Thread(
                target=_gen_client,
                name=f"gen{i}",
                daemon=True,
                args=(address, fingerprint, head, tail, span, cfg, tally, deadline, 1000 + i),
            )
            for i in range(gen_clients)
        ]
        threads += [
            threading.Thread(
                target=_train_client,
                name=f"train{i}",
                daemon=True,
                args=(address, fingerprint, head, tail, span, cfg, tally, deadline, 2000 + i),
            )
            for i in range(train_clients)
        ]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:  # a client finishes its current generation or step after the deadline
            t.join(timeout=seconds + 600)
        elapsed = time.monotonic() - started
        hung = sum(t.is_alive() for t in threads)
        sampler.stop.set()
        sampler.join(timeout=5)
        server_alive = proc.poll() is None
    if tally.errors:
        log.warning("%d client errors, first: %s", len(tally.errors), tally.errors[0])
    return {
        "model": model,
        "gen_clients": gen_clients,
        "train_clients": train_clients,
        "seconds": round(elapsed, 1),
        "span": f"{span[0]}:{span[1]}",
        "wire_dtype": wire_dtype,
        "gen_token_p50_ms": _pct(tally.token_latency, 50),
        "gen_token_p99_ms": _pct(tally.token_latency, 99),
        "gen_prefill_p50_ms": _pct(tally.prefill_latency, 50),
        "gen_prefill_p99_ms": _pct(tally.prefill_latency, 99),
        "gen_tokens": tally.tokens,
        "gen_tokens_per_s": tally.tokens / elapsed,
        "generations": tally.generations,
        "train_step_p50_ms": _pct(tally.step_latency, 50),
        "train_step_p99_ms": _pct(tally.step_latency, 99),
        "train_steps": tally.steps,
        "train_steps_per_s": tally.steps / elapsed,
        "train_examples_per_s": tally.examples / elapsed,
        "errors": len(tally.errors),
        "clients_hung": hung,
        "server_alive": server_alive,
        "server_idle_rss_mib": idle_rss / 2**20,
        "server_peak_rss_mib": sampler.peak / 2**20,
        "server_peak_growth_mib": (sampler.peak - idle_rss) / 2**20,
        "memory_budget_mib": cfg.memory_budget / 2**20,
        "first_error": tally.errors[0][:200] if tally.errors else "",
    }
