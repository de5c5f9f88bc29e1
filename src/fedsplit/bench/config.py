"""What each bench and demo command runs: one config dataclass per command; each field is an option.

Kept apart from the benches themselves (as model configurations are kept apart from models) so
that the CLI can build every command's options from them without importing torch at start-up.
A bench's entry point takes its config object: ``run(GenerateBenchConfig(model="tiny-llama"))``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from ..client.config import MODEL_HELP, device_field, dtype_field
from ..server.config import SIZE
from .simulate import SimulateConfig, parse_floats

DEFAULT_NOISE = 0.02  # relative to each token's RMS (the demo's and the paper's order of magnitude)


@dataclass
class GenerateBenchConfig:
    """`fedsplit bench generate`: every field is an option."""

    model: str = field(default="smollm2-135m", metadata={"help": MODEL_HELP})
    new_tokens: int = field(default=128, metadata={"help": "tokens generated per run (greedy, batch 1)"})
    head_layers: int = field(default=2, metadata={"help": "p"})
    tail_layers: int = field(default=2, metadata={"help": "q"})
    wire_dtype: str = field(default="fp16", metadata={"help": "fp32 | fp16 | bf16 | int8"})
    context: int = field(default=512, metadata={"help": "prompt length for the cache vs no-cache comparison"})
    no_cache_tokens: int = field(
        default=8, metadata={"help": "tokens timed for the cache vs no-cache comparison"}
    )
    device: str = device_field(
        "where client, server and the unsplit model compute, side by side: auto, cpu, cuda, cuda:N"
    )
    dtype: str = dtype_field(
        "compute dtype of client, server and the unsplit model: auto (bf16 on CUDA), fp32, bf16, fp16"
    )


@dataclass
class LoadBenchConfig:
    """`fedsplit bench load`: every field is an option."""

    model: str = field(default="smollm2-135m", metadata={"help": MODEL_HELP})
    gen_clients: int = field(
        default=32, metadata={"help": "concurrent generation clients (one session each at a time)"}
    )
    train_clients: int = field(default=8, metadata={"help": "concurrent training clients"})
    seconds: float = field(default=120.0, metadata={"help": "how long the clients keep going"})
    head_layers: int = field(default=2, metadata={"help": "p"})
    tail_layers: int = field(default=2, metadata={"help": "q"})
    wire_dtype: str = field(default="fp16", metadata={"help": "fp32 | fp16 | bf16 | int8"})
    prompt_tokens: int = field(default=32, metadata={"help": "prompt length of each generation"})
    new_tokens: int = field(default=32, metadata={"help": "tokens per generation"})
    train_batch: int = field(default=2, metadata={"help": "examples per training step"})
    train_length: int = field(default=64, metadata={"help": "tokens per training example"})
    memory_budget: int = field(default=4 << 30, metadata={"help": "the server's --memory-budget", **SIZE})
    client_threads: int = field(
        default=1, metadata={"help": "compute threads of this process, which runs every client"}
    )
    device: str = device_field("where the clients and the server compute: auto, cpu, cuda, cuda:N")
    dtype: str = dtype_field(
        "compute dtype of clients and server: auto (bf16 on CUDA, fp32 on cpu), fp32, bf16, fp16"
    )


@dataclass
class MemoryBenchConfig:
    """`fedsplit bench memory`: every field is an option."""

    model: str = field(default="smollm2-135m", metadata={"help": MODEL_HELP})
    head_layers: int = field(default=2, metadata={"help": "p"})
    tail_layers: int = field(default=2, metadata={"help": "q"})
    device: str = device_field("where each party's weights are loaded: auto, cpu, cuda, cuda:N")
    dtype: str = dtype_field("dtype of the weights: auto (bf16 on CUDA, fp32 on cpu), fp32, bf16, fp16")


@dataclass
class QualityBenchConfig:
    """`fedsplit bench quality`: every field is an option."""

    model: str = field(default="smollm2-135m", metadata={"help": MODEL_HELP})
    task: str = field(default="sentiment", metadata={"help": "task to fine-tune and score"})
    steps: int = field(default=100, metadata={"help": "training steps per run"})
    batch_size: int = field(default=8, metadata={"help": "examples per step"})
    lr: float = field(default=3e-4, metadata={"help": "learning rate"})
    eval_examples: int = field(default=300, metadata={"help": "test examples scored per run"})
    max_length: int = field(default=96, metadata={"help": "token limit per example"})
    noise: float = field(
        default=DEFAULT_NOISE,
        metadata={"help": "the 'default noise' run: Gaussian std relative to token RMS"},
    )
    seed: int = field(default=0, metadata={"help": "same seed and data for every run"})
    head_layers: int = field(default=2, metadata={"help": "p of the split runs"})
    tail_layers: int = field(default=2, metadata={"help": "q of the split runs"})
    wire_dtype: str = field(
        default="fp32",
        metadata={
            "help": "wire dtype of the split runs: fp32 isolates the split itself; "
            "fp16/bf16/int8 add the wire's rounding"
        },
    )
    out: str | None = field(
        default="results/quality",
        metadata={"help": "folder for quality.json / quality.md / adapters"},
    )
    device: str = device_field("where every run computes (client and server): auto, cpu, cuda, cuda:N")
    dtype: str = dtype_field("compute dtype of every run: auto (bf16 on CUDA, fp32 on cpu), fp32, bf16, fp16")


@dataclass
class AttackConfig:
    """`fedsplit attack`: every field is an option."""

    attack: str = field(
        default="vmi", metadata={"help": "vmi | relaxation | learned | bisr | nearest | label"}
    )
    defense: str | None = field(
        default=None, metadata={"help": "defence spec on the hidden states, e.g. gaussian:0.05"}
    )
    head_layers: int = field(default=2, metadata={"help": "p: blocks in the client's head"})
    task: str = field(default="sentiment", metadata={"help": "victim texts come from this task's test split"})
    n: int = field(default=200, metadata={"help": "victim examples"})
    model: str = field(default="smollm2-135m", metadata={"help": MODEL_HELP})
    seed: int = field(default=0, metadata={"help": "seed"})
    quick: bool = field(default=False, metadata={"help": "fewer optimisation steps"})
    utility_examples: int = field(
        default=48, metadata={"help": "task examples for the defence's utility cost"}
    )
    grad_defense: str | None = field(
        default=None,
        metadata={
            "help": "label attack: defence on the gradient the client sends, e.g. gaussian:0.3:relative"
        },
    )
    device: str = device_field("where the victim client and the attacker compute: auto, cpu, cuda, cuda:N")
    dtype: str = dtype_field(
        "dtype of the model's weights: auto (bf16 on CUDA, fp32 on cpu), fp32, bf16, fp16"
    )


@dataclass
class PrivacyBenchConfig:
    """`fedsplit bench privacy`: every field is an option."""

    quick: bool = field(default=False, metadata={"help": "small grid (<= 5 min); default: the full sweep"})
    after_finetune: bool = field(
        default=False,
        metadata={
            "help": "judge each defence on the model fine-tuned with it on, attacked at three tiers over gRPC "
            "(rows resume from OUT/rows.jsonl)"
        },
    )
    configs: str | None = field(
        default=None,
        metadata={
            "help": "with --after-finetune: only these configurations, P:SPEC separated by ';' "
            "(e.g. '2:none;2:adv:1')",
            "metavar": "P:SPEC;...",
        },
    )
    steps: int = field(
        default=0,
        metadata={"help": "with --after-finetune: fine-tuning steps per configuration (0: the grid's)"},
    )
    labels: bool = field(
        default=False,
        metadata={
            "help": "with --after-finetune: judge gradient defences instead: fine-tuned accuracy against "
            "label inference from the gradients captured at the server (rows resume from OUT/labels.jsonl)"
        },
    )
    grad_configs: str | None = field(
        default=None,
        metadata={
            "help": "with --labels: only these gradient defences, separated by ';', each optionally with a "
            "hidden-state defence after '@' (e.g. 'none;gaussian:0.3:relative;"
            "gaussian:0.3:relative@textdx:4+bypass')",
            "metavar": "GRAD[@SPEC];...",
        },
    )
    model: str = field(default="smollm2-135m", metadata={"help": MODEL_HELP})
    task: str = field(default="sentiment", metadata={"help": "victim texts and utility task"})
    seed: int = field(default=0, metadata={"help": "seed of the victims, the attacks and the noise"})
    out: str | None = field(
        default="results/privacy",
        metadata={
            "help": "folder for privacy.json, privacy.md, PNG plots (--after-finetune: privacy_ft.md, "
            "privacy_ft.json, frontier.png, rows.jsonl, runs/)"
        },
    )
    device: str = device_field("where victims and attackers compute: auto, cpu, cuda, cuda:N")
    dtype: str = dtype_field(
        "dtype of the model's weights: auto (bf16 on CUDA, fp32 on cpu), fp32, bf16, fp16"
    )


@dataclass
class DemoConfig:
    """`fedsplit demo`: every field is an option."""

    model: str = field(default="smollm2-135m", metadata={"help": MODEL_HELP})
    steps: int = field(default=30, metadata={"help": "training steps"})
    batch_size: int = field(default=4, metadata={"help": "examples per step"})
    noise: float = field(
        default=0.02,
        metadata={"help": "Gaussian noise std on hidden states sent (relative to each token's RMS)"},
    )
    eval_examples: int = field(default=36, metadata={"help": "test examples for accuracy before and after"})
    out: str = field(default="runs/demo", metadata={"help": "where the demo's adapters go"})
    device: str = device_field("where client and server compute: auto, cpu, cuda, cuda:N")
    dtype: str = dtype_field(
        "compute dtype of client and server: auto (bf16 on CUDA, fp32 on cpu), fp32, bf16, fp16"
    )


# Work small enough for a 2-core machine: the default model's figures take minutes, not hours.
# Keys are TrainModesConfig fields; a field left None (or 0, where 0 cannot run) takes these.
BENCH_DEFAULTS = {
    "tiny-llama": {
        "steps": 40,
        "batch_size": 2,
        "max_length": 48,
        "sync_every": 10,
        "head_layers": 1,
        "tail_layers": 1,
        "eval_examples": 200,
        # its ops are far too small to share across threads: a second server thread only spins
        # (measured: server-hierarchical 9.8 s -> 13.5 s at 20 ms)
        "server_threads": 1,
    },
    "default": {
        "steps": 4,
        "batch_size": 2,
        "max_length": 64,
        "sync_every": 2,
        "head_layers": 2,
        "tail_layers": 2,
        "eval_examples": 100,
        "server_threads": 0,  # one per core: the body is most of the compute
    },
}
_ZERO_IS_UNSET = ("steps", "batch_size", "max_length", "sync_every")


@dataclass
class TrainModesConfig:
    """`fedsplit bench train-modes`: every field is an option; :meth:`simulate_config` is the run.

    Fields that default to None take the model's entry of :data:`BENCH_DEFAULTS` (see :meth:`resolved`).
    """

    clients: int = field(default=8, metadata={"help": "client processes"})
    rtt_ms: tuple[float, ...] = field(
        default=(0.0, 20.0, 50.0),
        metadata={
            "help": "round-trip times to measure, comma-separated",
            "parse": parse_floats,
            "metavar": "MS,...",
        },
    )
    model: str = field(default="smollm2-135m", metadata={"help": MODEL_HELP})
    steps: int | None = field(
        default=None, metadata={"help": "steps per client (default: 40 on tiny-llama, else 4)"}
    )
    batch_size: int | None = field(default=None, metadata={"help": "examples per step (default: 2)"})
    max_length: int | None = field(
        default=None, metadata={"help": "token limit (default: 48 on tiny-llama, else 64)"}
    )
    sync_every: int | None = field(
        default=None,
        metadata={
            "help": "body/head/tail FedAvg period in steps, all modes (default: 10 on tiny-llama, else 2)"
        },
    )
    head_layers: int | None = field(default=None, metadata={"help": "p (default: 1 on tiny-llama, else 2)"})
    tail_layers: int | None = field(default=None, metadata={"help": "q (default: 1 on tiny-llama, else 2)"})
    partition: str = field(default="iid", metadata={"help": "iid or dirichlet:ALPHA"})
    bandwidth_mbps: float = field(
        default=0.0, metadata={"help": "per-client bandwidth cap at RTT > 0 (0 = none)"}
    )
    lr: float = field(default=2e-4, metadata={"help": "AdamW learning rate"})
    eval_examples: int | None = field(
        default=None,
        metadata={
            "help": "test examples per mode's global model, at the first RTT (default: 200 on tiny-llama, "
            "else 100; 0 = skip)"
        },
    )
    repeats: int = field(
        default=1, metadata={"help": "runs per mode and RTT, interleaved; medians are reported"}
    )
    server_threads: int | None = field(
        default=None,
        metadata={
            "help": "compute threads of the server, every mode (0: one per core; default: 1 on tiny-llama, "
            "else 0); clients use one each"
        },
    )
    gather_ms: float = field(
        default=250.0,
        metadata={
            "help": "server-hierarchical: how long a body pass waits for clients about to send a forward"
        },
    )
    body_lr_scale: str = field(
        default="linear",
        metadata={
            "help": "body LoRA learning rate of the parallel modes: linear = lr x clients (one body step, "
            "or one FedAvg of the replicas, covers every client's batch), sqrt = lr x sqrt(clients), "
            "none = lr"
        },
    )
    out: str = field(default="results/train-modes", metadata={"help": "report folder"})
    device: str = device_field("where the clients and the server compute: auto, cpu, cuda, cuda:N")
    dtype: str = dtype_field(
        "compute dtype of clients and server: auto (bf16 on CUDA, fp32 on cpu), fp32, bf16, fp16"
    )

    def resolved(self) -> TrainModesConfig:
        """This config with every unset field taken from the model's :data:`BENCH_DEFAULTS`."""
        defaults = BENCH_DEFAULTS.get(self.model, BENCH_DEFAULTS["default"])
        unset = {
            f.name: defaults[f.name]
            for f in fields(self)
            if f.name in defaults
            and (getattr(self, f.name) is None or (f.name in _ZERO_IS_UNSET and not getattr(self, f.name)))
        }
        return replace(self, **unset)

    def simulate_config(self) -> SimulateConfig:
        """The clients, data and server of every run (a run then sets its mode, RTT and body lr)."""
        cfg = self.resolved()
        return SimulateConfig(
            model=cfg.model,
            clients=cfg.clients,
            partition=cfg.partition,
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
            head_layers=(cfg.head_layers,),
            tail_layers=(cfg.tail_layers,),
            lr=cfg.lr,
            # one period for every mode: server-hierarchical's body syncs and all three modes'
            # head/tail FedAvg, so the modes differ only in how the body trains
            sync_every=cfg.sync_every,
            fedavg_every=cfg.sync_every,
            bandwidth_mbps=cfg.bandwidth_mbps,
            eval_examples=0,  # evaluated once per mode by the bench, not per run
            server_threads=cfg.server_threads,
            gather_ms=cfg.gather_ms,
            device=cfg.device,
            dtype=cfg.dtype,
        )


def parse_session_counts(text: str) -> tuple[int, ...]:
    """``"1,8,32"`` -> ``(1, 8, 32)``: positive, sorted, without repeats; ValueError says what is accepted."""
    try:
        counts = {int(x) for x in text.split(",")}
    except ValueError:
        counts = set()
    if not counts or min(counts) < 1:
        raise ValueError(f"takes positive integers separated by commas (e.g. 1,8,32), not {text!r}")
    return tuple(sorted(counts))


@dataclass
class CapacityBenchConfig:
    """`fedsplit bench capacity`: every field is an option; :meth:`check` refuses what cannot run."""

    model: str = field(default="smollm2-135m", metadata={"help": MODEL_HELP})
    sessions: tuple[int, ...] = field(
        default=(1, 8, 32),
        metadata={
            "help": "concurrent sessions to measure, comma-separated (1 is always measured too: "
            "the baseline of the ratios)",
            "parse": parse_session_counts,
            "metavar": "N,...",
        },
    )
    stages: tuple[int, ...] = field(
        default=(1,),
        metadata={
            "help": "pipeline stages of the server's body to measure, comma-separated: 1 is one process, "
            "S > 1 a `fedsplit serve --stages S` on a local Ray (the ray extra); with more than one, 1 is "
            "measured too and the latency one stage hop adds per token is reported",
            "parse": parse_session_counts,
            "metavar": "S,...",
        },
    )
    prompt_tokens: int = field(default=32, metadata={"help": "prefill length of each generation session"})
    new_tokens: int = field(default=64, metadata={"help": "decode steps timed per generation session"})
    train_steps: int = field(
        default=8, metadata={"help": "training steps per training session (0: skip the training table)"}
    )
    train_length: int = field(default=64, metadata={"help": "tokens per training step (batch 1)"})
    repeats: int = field(
        default=1, metadata={"help": "sweeps over --sessions, one after the other; medians are reported"}
    )
    head_layers: int = field(default=2, metadata={"help": "p: the body span starts here"})
    tail_layers: int = field(default=2, metadata={"help": "q: the body span ends q layers before the top"})
    wire_dtype: str = field(default="fp16", metadata={"help": "fp32 | fp16 | bf16 | int8"})
    device: str = device_field("where the server's body computes: auto, cpu, cuda, cuda:N")
    dtype: str = dtype_field(
        "compute dtype of the server's body: auto (bf16 on CUDA, fp32 on cpu), fp32, bf16, fp16"
    )

    def check(self) -> None:
        """ValueError, one line, for a value no run can use (before anything is loaded)."""
        if len(self.stages) > 1 or self.stages != (1,):
            try:
                import ray  # noqa: F401 - only whether it is there
            except ImportError:
                raise ValueError(
                    f"--stages {','.join(map(str, self.stages))}: stages > 1 need Ray (pip install "
                    "'fedsplit[ray]')"
                ) from None
        for name in ("prompt_tokens", "new_tokens", "train_length", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.train_steps < 0:
            raise ValueError("--train-steps must be 0 (no training table) or more")
