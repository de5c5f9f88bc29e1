"""`fedsplit bench capacity`: what one server carries as the number of concurrent sessions grows.

The server is a ``fedsplit serve`` child process, so the clients (threads of this process) never
hold its GIL; its body computes on ``--device`` in ``--dtype``. The clients are synthetic: no head,
no tail, no model in this process. Each one opens a real gRPC session (:class:`RemoteTransport`,
one channel per client) and sends random hidden states of the shape a real head would send,
generated before the clock starts; a client thread does nothing but encode them and wait on the
network, so what is measured is the server (and the loopback transport).

For each N in ``--sessions`` (1 is always measured: the baseline of the ratios):

* **decode**: N generation sessions open, prefill ``[1, prompt_tokens, hidden]`` at the same time
  (the mean prefill time is reported), wait for each other, then all decode ``new_tokens`` steps of
  ``[1, 1, hidden]``, each step timed as the client sees it. Aggregate tokens/s = the decode steps
  of all sessions / the wall time from the first decode step sent to the last one answered, so the
  server's continuous batching (``server/batching.py``) shows as a ratio above 1.
* **train**: N training sessions (a private body LoRA each) run ``train_steps`` steps of forward
  (``keep_graph``) + backward of a random gradient + optimiser step; aggregate steps/s likewise.

``ratio`` is aggregate(N) / aggregate(1): N times the single-session rate is perfect scaling.
With ``--repeats`` the whole sweep runs again; throughputs are medians over the repeats and
latency percentiles pool every step of every repeat. A client error is counted (``errors_nN``)
and its session's work left out of the figures, not retried.

With ``--stages 1,2`` the sweep runs against a one-process server, then against a
``fedsplit serve --stages 2`` (its body in two Ray actor stages on a local Ray), in the same run;
the second's figures are prefixed ``s2_``, and ``stage_hop_ms_s2`` is the latency one stage hop
adds to a decode token.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from ..client.remote import RemoteTransport
from ..model.device import resolve_device, resolve_dtype
from ..model.loading import load_config, model_fingerprint
from ..model.lora import LoraSettings
from ..model.split import body_span, num_layers
from ..wire.protocol import SessionConfig
from .config import CapacityBenchConfig
from .procs import placement_args, server_process
from .report import write_json

log = logging.getLogger(__name__)

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_WARMUP_TOKENS = 4  # decode steps of the untimed session that warms the server up


@dataclass
class RunResult:
    """What the client threads of one run (one N, one kind) record; appends are atomic under the GIL."""

    latencies: list[float] = field(default_factory=list)  # seconds per decode token or training step
    prefills: list[float] = field(default_factory=list)  # seconds per prefill (decode runs)
    starts: list[float] = field(default_factory=list)  # perf_counter when each session began its timed part
    ends: list[float] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    @property
    def wall(self) -> float:
        """Seconds from the first timed request sent to the last one answered (0 when none was)."""
        return max(self.ends) - min(self.starts) if self.ends else 0.0

    def rate(self) -> float:
        """Tokens (or steps) answered per second of :attr:`wall`, over all sessions."""
        return len(self.latencies) / self.wall if self.wall > 0 else 0.0


@dataclass
class Inputs:
    """Random hidden states and gradients for ``count`` sessions, in the wire's dtype, made in advance."""

    prefills: list[torch.Tensor]  # [1, prompt_tokens, hidden] per session
    steps: list[torch.Tensor]  # [new_tokens, 1, 1, hidden] per session
    train_hidden: list[torch.Tensor]  # [1, train_length, hidden] per session, sent every step
    train_grads: list[torch.Tensor]  # gradient of the body's output, same shape

    @classmethod
    def random(cls, count: int, hidden: int, cfg: CapacityBenchConfig, seed: int = 0) -> Inputs:
        gen = torch.Generator().manual_seed(seed)

        def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
            return (torch.randn(*shape, generator=gen) * scale).to(torch.float16)

        train = cfg.train_steps > 0
        return cls(
            prefills=[randn(1, cfg.prompt_tokens, hidden) for _ in range(count)],
            steps=[randn(cfg.new_tokens, 1, 1, hidden) for _ in range(count)],
            train_hidden=[randn(1, cfg.train_length, hidden) for _ in range(count if train else 0)],
            train_grads=[
                randn(1, cfg.train_length, hidden, scale=1e-3) for _ in range(count if train else 0)
            ],
        )


_NO_PAD = torch.zeros(1, dtype=torch.long)


def _decode_client(index, address, fingerprint, span, cfg, inputs, barrier, result, new_tokens) -> None:
    """One generation session: open, prefill (timed), wait for the others, decode ``new_tokens`` steps."""
    transport = RemoteTransport(address, wire_dtype=cfg.wire_dtype, fingerprint=fingerprint, retries=2)
    session = None
    try:
        session = transport.open(
            SessionConfig(
                span=span, mode="generate", max_length=cfg.prompt_tokens + cfg.new_tokens, max_batch=1
            )
        )
        barrier.wait()  # every session open: the prefills go together
        start = time.perf_counter()
        session.forward(0, inputs.prefills[index], _NO_PAD, 0)
        result.prefills.append(time.perf_counter() - start)
        barrier.wait()  # every prefill done: the decode steps go together
        steps = inputs.steps[index]
        first = time.perf_counter()
        for i in range(new_tokens):
            start = time.perf_counter()
            session.forward(i + 1, steps[i], _NO_PAD, cfg.prompt_tokens + i)
            result.latencies.append(time.perf_counter() - start)
        result.starts.append(first)
        result.ends.append(time.perf_counter())
    except threading.BrokenBarrierError:
        pass  # another session failed; its error is the one recorded
    except Exception as exc:
        result.errors.append(exc)
        barrier.abort()
    finally:
        if session is not None:
            session.close()
        transport.close()


def _train_client(index, address, fingerprint, span, cfg, inputs, barrier, result, steps) -> None:
    """One training session: open, wait for the others, run ``steps`` forward + backward + step."""
    transport = RemoteTransport(address, wire_dtype=cfg.wire_dtype, fingerprint=fingerprint, retries=2)
    session = None
    try:
        session = transport.open(
            SessionConfig(
                span=span,
                mode="train",
                max_length=cfg.train_length,
                max_batch=1,
                lora=LoraSettings(rank=8, alpha=16.0),
                seed=index,
            )
        )
        hidden, grad = inputs.train_hidden[index], inputs.train_grads[index]
        barrier.wait()
        first = time.perf_counter()
        for step in range(steps):
            start = time.perf_counter()
            session.forward(step, hidden, _NO_PAD, 0, keep_graph=True)
            session.backward(step, grad)
            session.step()
            result.latencies.append(time.perf_counter() - start)
        result.starts.append(first)
        result.ends.append(time.perf_counter())
    except threading.BrokenBarrierError:
        pass
    except Exception as exc:
        result.errors.append(exc)
        barrier.abort()
    finally:
        if session is not None:
            session.close()
        transport.close()


def run_clients(client, count: int, common: tuple, amount: int) -> RunResult:
    """Run ``count`` sessions of ``client`` (:func:`_decode_client` or :func:`_train_client`), one thread
    each, for ``amount`` decode tokens or training steps each; wait for all of them."""
    result = RunResult()
    barrier = threading.Barrier(count)
    threads = [
        threading.Thread(target=client, args=(i, *common, barrier, result, amount), daemon=True)
        for i in range(count)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return result


def _ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def summarise(counts: tuple[int, ...], decode: dict, train: dict) -> dict:
    """Flat figures per N from the runs (``decode[n]`` / ``train[n]``: a RunResult per repeat).

    Keys: ``decode_tokens_per_s_nN``, ``decode_ratio_nN``, ``token_p50_ms_nN``, ``token_p99_ms_nN``,
    ``prefill_mean_ms_nN``, and with training ``train_steps_per_s_nN``, ``train_ratio_nN``,
    ``train_step_p50_ms_nN``, ``train_step_p99_ms_nN``; ``errors_nN`` counts both kinds.
    """
    figures: dict = {}

    def pooled(runs: list[RunResult], name: str) -> list[float]:
        return [x for run in runs for x in getattr(run, name)]

    base_decode = statistics.median(run.rate() for run in decode[1])
    base_train = statistics.median(run.rate() for run in train[1]) if train else 0.0
    for n in counts:
        rate = statistics.median(run.rate() for run in decode[n])
        tokens = pooled(decode[n], "latencies")
        prefills = pooled(decode[n], "prefills")
        figures[f"decode_tokens_per_s_n{n}"] = rate
        figures[f"decode_ratio_n{n}"] = rate / base_decode if base_decode else float("nan")
        figures[f"token_p50_ms_n{n}"] = _ms(tokens, 50)
        figures[f"token_p99_ms_n{n}"] = _ms(tokens, 99)
        figures[f"prefill_mean_ms_n{n}"] = 1000 * statistics.fmean(prefills) if prefills else float("nan")
        errors = sum(len(run.errors) for run in decode[n])
        if train:
            rate = statistics.median(run.rate() for run in train[n])
            steps = pooled(train[n], "latencies")
            figures[f"train_steps_per_s_n{n}"] = rate
            figures[f"train_ratio_n{n}"] = rate / base_train if base_train else float("nan")
            figures[f"train_step_p50_ms_n{n}"] = _ms(steps, 50)
            figures[f"train_step_p99_ms_n{n}"] = _ms(steps, 99)
            errors += sum(len(run.errors) for run in train[n])
        figures[f"errors_n{n}"] = errors
    return figures


def _sweep(cfg: CapacityBenchConfig, counts: tuple[int, ...], span, fingerprint, inputs, stages: int):
    """Every N of ``counts`` (``cfg.repeats`` times) against one server process of ``stages`` stages:
    ``(decode, train)``, a list of RunResult per N each (``train`` empty without training)."""
    decode: dict[int, list[RunResult]] = {n: [] for n in counts}
    train: dict[int, list[RunResult]] = {n: [] for n in counts} if cfg.train_steps else {}
    args = [*placement_args(cfg.device, cfg.dtype), *(["--stages", str(stages)] if stages > 1 else [])]
    with server_process(cfg.model, *args) as (address, _):
        common = (address, fingerprint, span, cfg, inputs)
        # Untimed: the server's first requests pay for allocations (and CUDA kernel loading).
        warm = run_clients(_decode_client, 1, common, min(_WARMUP_TOKENS, cfg.new_tokens))
        if cfg.train_steps:
            warm.errors += run_clients(_train_client, 1, common, 1).errors
        if warm.errors:
            raise warm.errors[0]
        for _ in range(cfg.repeats):
            for n in counts:
                result = run_clients(_decode_client, n, common, cfg.new_tokens)
                decode[n].append(result)
                log.info("capacity: %d stage(s), N=%d decode %.1f tokens/s", stages, n, result.rate())
                if train:
                    result = run_clients(_train_client, n, common, cfg.train_steps)
                    train[n].append(result)
                    log.info("capacity: %d stage(s), N=%d train %.2f steps/s", stages, n, result.rate())
    return decode, train


def stage_prefix(stages: int) -> str:
    """Prefix of a stage count's figures: none for one process (the keys of a run without stages)."""
    return "" if stages == 1 else f"s{stages}_"


def run(cfg: CapacityBenchConfig) -> dict:
    """Sweep the session counts against one server process per stage count; one flat dict of figures.

    Figures of ``--stages 1`` keep their plain keys; those of S stages are prefixed ``sS_``. With
    more than one stage count, ``stage_hop_ms_sS`` is the per-token latency one stage hop adds:
    (median decode latency of one session with S stages - with 1) / (S - 1).
    """
    cfg.check()
    counts = tuple(sorted({1, *cfg.sessions}))
    stage_counts = tuple(sorted({1, *cfg.stages})) if cfg.stages != (1,) else (1,)
    config = load_config(cfg.model)
    span = body_span(num_layers(config), cfg.head_layers, cfg.tail_layers)
    hidden = int(config.hidden_size)
    device = resolve_device(cfg.device)  # what the server resolves "auto" to on this same machine
    dtype = resolve_dtype(cfg.dtype, device)
    fingerprint = model_fingerprint(cfg.model)
    inputs = Inputs.random(max(counts), hidden, cfg)
    started = time.monotonic()
    figures: dict = {}
    errors: list[BaseException] = []
    for stages in stage_counts:
        decode, train = _sweep(cfg, counts, span, fingerprint, inputs, stages)
        prefix = stage_prefix(stages)
        figures.update({prefix + k: v for k, v in summarise(counts, decode, train).items()})
        errors += [e for runs in (*decode.values(), *train.values()) for r in runs for e in r.errors]
    for stages in stage_counts[1:]:
        added = figures[f"{stage_prefix(stages)}token_p50_ms_n1"] - figures["token_p50_ms_n1"]
        figures[f"stage_hop_ms_s{stages}"] = added / (stages - 1)
    first_error = errors[0] if errors else None
    if first_error is not None:
        log.warning("capacity: client errors, first: %s", first_error)
    return {
        "model": cfg.model,
        "span": f"{span[0]}:{span[1]}",
        "hidden_size": hidden,
        "stages": ",".join(map(str, stage_counts)),
        "sessions": ",".join(map(str, counts)),
        "prompt_tokens": cfg.prompt_tokens,
        "new_tokens": cfg.new_tokens,
        "train_steps": cfg.train_steps,
        "train_length": cfg.train_length,
        "repeats": cfg.repeats,
        "wire_dtype": cfg.wire_dtype,
        "device": str(device),
        "dtype": _DTYPE_NAMES.get(dtype, str(dtype)),
        **figures,
        "first_error": str(first_error)[:200] if first_error is not None else "",
        "seconds": round(time.monotonic() - started, 1),
    }


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def show(figures: dict, json_path=None) -> None:
    """Print the decode table and (with training) the training table of each stage count, the latency
    a stage hop adds, and write the figures as JSON."""
    counts = [int(n) for n in figures["sessions"].split(",")]
    console = Console()
    for stages in (int(s) for s in str(figures["stages"]).split(",")):
        _show_stages(console, figures, counts, stages)
    for key, value in figures.items():
        if key.startswith("stage_hop_ms_s"):
            stages = int(key.removeprefix("stage_hop_ms_s"))
            console.print(
                f"a stage hop adds {value:.3g} ms per decode token (1 session, p50: "
                f"{stages} stages vs 1 process)"
            )
    if figures["first_error"]:
        console.print(f"first client error: {figures['first_error']}")
    write_json(figures, json_path)


def _show_stages(console: Console, figures: dict, counts: list[int], stages: int) -> None:
    pre = stage_prefix(stages)
    body = "one process" if stages == 1 else f"{stages} Ray stages"
    where = (
        f"{figures['model']}, body {figures['span']} ({body}) on {figures['device']} in {figures['dtype']}, "
        f"{figures['wire_dtype']} wire"
    )
    decode = Table(
        title=f"fedsplit bench capacity, decode: {where}; prefill {figures['prompt_tokens']} tokens, "
        f"{figures['new_tokens']} decode steps per session"
    )
    for column in (
        "sessions",
        "tokens/s",
        "vs 1 session",
        "p50 ms/token",
        "p99 ms/token",
        "prefill ms",
        "errors",
    ):
        decode.add_column(column, justify="right")
    for n in counts:
        decode.add_row(
            str(n),
            _cell(figures[f"{pre}decode_tokens_per_s_n{n}"]),
            f"{figures[f'{pre}decode_ratio_n{n}']:.2f}x",
            _cell(figures[f"{pre}token_p50_ms_n{n}"]),
            _cell(figures[f"{pre}token_p99_ms_n{n}"]),
            _cell(figures[f"{pre}prefill_mean_ms_n{n}"]),
            str(figures[f"{pre}errors_n{n}"]),
        )
    console.print(decode)
    if figures["train_steps"]:
        train = Table(
            title=f"fedsplit bench capacity, training: {where}; {figures['train_steps']} steps of "
            f"{figures['train_length']} tokens per session"
        )
        for column in ("sessions", "steps/s", "vs 1 session", "p50 ms/step", "p99 ms/step"):
            train.add_column(column, justify="right")
        for n in counts:
            train.add_row(
                str(n),
                _cell(figures[f"{pre}train_steps_per_s_n{n}"]),
                f"{figures[f'{pre}train_ratio_n{n}']:.2f}x",
                _cell(figures[f"{pre}train_step_p50_ms_n{n}"]),
                _cell(figures[f"{pre}train_step_p99_ms_n{n}"]),
            )
        console.print(train)
