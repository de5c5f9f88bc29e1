"""One fine-tuning run: every field is a ``fedsplit train`` option (and a key of ``--config`` files)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config stays cheap to import: the CLI builds its options from it at start-up
    from ..model.lora import LoraSettings

MODEL_HELP = "preset (smollm2-135m, tiny-llama), Hugging Face id, local directory or .gguf file"
DEVICE_HELP = (
    "where the client's head and tail run: auto (CUDA when torch sees a GPU, else cpu), cpu, cuda, cuda:N"
)
DTYPE_HELP = "compute dtype of the weights: auto (bf16 on CUDA, fp32 on cpu), fp32, bf16, fp16"
DEFENSE_HELP = (
    "defence on the hidden states sent to the server, e.g. gaussian:0.1:relative, dp:clip=1,sigma=0.5, "
    "adv:0.1 (grammar: docs/privacy.md); 'none' for none; unset: the default defence"
)


def check_device(text: str) -> str:
    """``text`` if it names a device this machine has (see :func:`fedsplit.model.device.resolve_device`)."""
    from ..model.device import resolve_device  # torch: only when a command runs, not at start-up

    try:
        resolve_device(text)
    except ValueError as exc:  # shown after the option's name: "--device 'cuda' asks for CUDA ..."
        raise ValueError(str(exc).removeprefix("device ")) from None
    return text


def check_dtype(text: str) -> str:
    """``text`` if it names a compute dtype (see :func:`fedsplit.model.device.resolve_dtype`)."""
    from ..model.device import resolve_dtype

    try:
        resolve_dtype(text)
    except ValueError as exc:
        raise ValueError(str(exc).removeprefix("dtype ")) from None
    return text


def check_defense(text: str) -> str:
    """``text`` if it is a defence spec by the grammar of ``docs/privacy.md`` ("none" included).

    Only the syntax is checked here; values out of range surface when the defence is built.
    """
    from ..privacy.spec import parse_defense_items  # torch: only when a command runs

    try:
        parse_defense_items(text)
    except ValueError as exc:  # shown after the option's name: "--defense 'x' is not ..."
        first = str(exc).splitlines()[0].removeprefix(f"invalid defence spec {text!r}: ")
        raise ValueError(f"{text!r} is not a defence spec: {first} (grammar: docs/privacy.md)") from None
    return text


def defense_field(help: str = DEFENSE_HELP):
    """A ``defense`` field: a spec, "none", or unset for the default defence; syntax checked at start."""
    return field(default=None, metadata={"help": help, "parse": check_defense, "metavar": "SPEC"})


def device_field(help: str = DEVICE_HELP):
    """A ``device`` field: "auto" by default, checked when the command starts."""
    return field(default="auto", metadata={"help": help, "parse": check_device})


def dtype_field(help: str = DTYPE_HELP):
    """A ``dtype`` field: "auto" by default, checked when the command starts."""
    return field(default="auto", metadata={"help": help, "parse": check_dtype})


def tls_cert_field():
    """A client certificate (PEM) for mutual TLS; ``FEDSPLIT_TLS_CERT`` too."""
    return field(
        default=None,
        metadata={"help": "client certificate (PEM) for mutual TLS", "envvar": "FEDSPLIT_TLS_CERT"},
    )


def tls_key_field():
    """The key of the client certificate (PEM); ``FEDSPLIT_TLS_KEY`` too."""
    return field(default=None, metadata={"help": "key of --tls-cert (PEM)", "envvar": "FEDSPLIT_TLS_KEY"})


@dataclass
class TrainConfig:
    """One fine-tuning run; every field is a `fedsplit train` option."""

    model: str = field(default="smollm2-135m", metadata={"help": MODEL_HELP})
    server: str | None = field(
        default=None,
        metadata={"help": "HOST:PORT of a fedsplit server (omit with --local or --centralized)"},
    )
    head_layers: int = field(default=2, metadata={"help": "p: decoder blocks in the client's head"})
    tail_layers: int = field(default=2, metadata={"help": "q: decoder blocks in the client's tail"})
    task: str = field(
        default="sentiment", metadata={"help": "task (sentiment, summarization, dialogue, jsonl, boolq, ...)"}
    )
    data: str | None = field(
        default=None,
        metadata={
            "help": "the task's data: a JSONL file or folder (--task jsonl), a local copy or hub id (other tasks)"
        },
    )
    steps: int = field(default=200, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "examples per step"})
    lr: float = field(default=2e-4, metadata={"help": "AdamW learning rate (head, body and tail LoRA)"})
    body_lr: float | None = field(
        default=None, metadata={"help": "learning rate of the body LoRA on the server (default: --lr)"}
    )
    body_warmup: int = field(
        default=0,
        metadata={"help": "body optimiser steps over which the body lr ramps up linearly (0 = constant)"},
    )
    max_length: int = field(default=128, metadata={"help": "token limit per example"})
    max_examples: int | None = field(default=None, metadata={"help": "cap on examples per split"})
    noise: float = field(
        default=0.0,
        metadata={"help": "Gaussian noise std on hidden states sent (absolute; see --noise-relative)"},
    )
    noise_relative: bool = field(default=False, metadata={"help": "--noise is relative to each token's RMS"})
    defense: str | None = defense_field(DEFENSE_HELP + " (overrides --noise)")
    wire_dtype: str = field(default="fp16", metadata={"help": "fp32 | fp16 | bf16 | int8"})
    seed: int = field(default=0, metadata={"help": "seed for data order, LoRA init and noise"})
    eval_every: int = field(
        default=0, metadata={"help": "evaluate on the validation split every N steps (0 = only at the end)"}
    )
    eval_examples: int = field(default=200, metadata={"help": "examples per evaluation"})
    clip_norm: float = field(
        default=0.0,
        metadata={
            "help": "gradient norm clipping (0 = off; client and server clip their own LoRA separately)"
        },
    )
    rank: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha"})
    centralized: bool = field(
        default=False, metadata={"help": "baseline: the unsplit model, one process, same LoRA, no noise"}
    )
    token: str | None = field(default=None, metadata={"help": "bearer token", "envvar": "FEDSPLIT_TOKEN"})
    tls_ca: str | None = field(default=None, metadata={"help": "CA certificate for TLS"})
    tls_cert: str | None = tls_cert_field()
    tls_key: str | None = tls_key_field()
    out: str | None = field(
        default=None,
        metadata={"help": "where adapters (head/, body/, tail/) and summary.json go (unset: nowhere)"},
    )
    checkpoint_every: int = field(
        default=0,
        metadata={
            "help": "every K steps save head/tail LoRA, optimizer and data position "
            "under OUT/checkpoints and ask the server to checkpoint the body"
        },
    )
    resume: bool = field(
        default=False,
        metadata={"help": "continue the run in OUT from the last step client and server both hold"},
    )
    run_id: str | None = field(
        default=None,
        metadata={"help": "name of the run on the server (default: random, kept in OUT/run.json)"},
    )
    device: str = device_field(
        "where head and tail run (and the body with --local / --centralized): auto, cpu, cuda, cuda:N"
    )
    dtype: str = dtype_field()

    @property
    def lora(self) -> LoraSettings:
        from ..model.lora import LoraSettings

        return LoraSettings(rank=self.rank, alpha=self.alpha)

    def check(self) -> None:
        """Raise ValueError, naming the option, for a value no run can use."""
        positive = {
            "steps": self.steps,
            "batch-size": self.batch_size,
            "max-length": self.max_length,
            "lr": self.lr,
            "rank": self.rank,
        }
        if self.body_lr is not None:
            positive["body-lr"] = self.body_lr
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"--{name} must be positive (got {value})")
        counts = {
            "body-warmup": self.body_warmup,
            "eval-every": self.eval_every,
            "eval-examples": self.eval_examples,
            "checkpoint-every": self.checkpoint_every,
        }
        for name, value in counts.items():
            if value < 0:
                raise ValueError(f"--{name} must be 0 or more (got {value})")

    def defense_spec(self) -> str | None:
        """The defence spec of this run's client, or ``None`` for none.

        ``--defense`` if given (``"none"``: none), else ``--noise`` as a Gaussian defence, else the
        default defence (:func:`fedsplit.privacy.defaults.resolve_defense_spec`).
        """
        from ..privacy.defaults import resolve_defense_spec

        if not self.defense and self.noise > 0:
            return f"gaussian:{self.noise}" + (":relative" if self.noise_relative else "")
        return resolve_defense_spec(self.defense)


@dataclass
class EvalConfig:
    """Scoring a base or fine-tuned model on a task; every field is a `fedsplit eval` option."""

    task: str = field(default="sentiment", metadata={"help": "task to score"})
    data: str | None = field(
        default=None, metadata={"help": "the task's data (as for `fedsplit train --data`)"}
    )
    model: str = field(default="smollm2-135m", metadata={"help": MODEL_HELP})
    server: str | None = field(
        default=None, metadata={"help": "HOST:PORT; omit to run unsplit in this process"}
    )
    adapters: str | None = field(
        default=None, metadata={"help": "run folder from `fedsplit train` (head/ body/ tail/)"}
    )
    head_layers: int = field(default=2, metadata={"help": "p (split only)"})
    tail_layers: int = field(default=2, metadata={"help": "q (split only)"})
    max_examples: int = field(default=200, metadata={"help": "test examples"})
    split: str = field(default="test", metadata={"help": "train | val | test"})
    seed: int = field(default=0, metadata={"help": "data split seed (use the training seed)"})
    token: str | None = field(default=None, metadata={"help": "bearer token", "envvar": "FEDSPLIT_TOKEN"})
    defense: str | None = defense_field(
        DEFENSE_HELP + "; with --adapters and unset: the run's own defence and its trained weights. "
        "Without --server or --adapters, a defence other than 'none' scores the split model in this process"
    )
    device: str = device_field(
        "where the model runs (head and tail; the whole model without --server): auto, cpu, cuda, cuda:N"
    )
    dtype: str = dtype_field()

    def train_config(self) -> TrainConfig:
        """The client to score: split through ``server``, split in this process when ``adapters``
        (a split run's body adapter needs the split layout) or a defence (other than "none") are
        given, else unsplit (nothing leaves the process, so no defence applies)."""
        defended = self.defense is not None and self.defense.strip().lower() not in ("", "none")
        split = self.server is not None or self.adapters is not None or defended
        return TrainConfig(
            model=self.model,
            server=self.server,
            head_layers=self.head_layers,
            tail_layers=self.tail_layers,
            defense=self.defense,
            centralized=not split,
            token=self.token,
            seed=self.seed,
            device=self.device,
            dtype=self.dtype,
        )


@dataclass
class GenerateConfig:
    """Text generation with the split model; every field is a `fedsplit generate` option."""

    model: str = field(default="smollm2-135m", metadata={"help": MODEL_HELP})
    server: str | None = field(default=None, metadata={"help": "HOST:PORT of a fedsplit server"})
    head_layers: int = field(default=2, metadata={"help": "p: decoder blocks in the client's head"})
    tail_layers: int = field(default=2, metadata={"help": "q: decoder blocks in the client's tail"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens to generate"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold"})
    stream: bool = field(default=False, metadata={"help": "print tokens as they arrive (batch of one)"})
    token: str | None = field(default=None, metadata={"help": "bearer token", "envvar": "FEDSPLIT_TOKEN"})
    tls_ca: str | None = field(
        default=None, metadata={"help": "CA certificate to verify the server's TLS certificate"}
    )
    tls_cert: str | None = tls_cert_field()
    tls_key: str | None = tls_key_field()
    wire_dtype: str = field(default="fp16", metadata={"help": "fp32 | fp16 | bf16 | int8"})
    adapters: str | None = field(
        default=None, metadata={"help": "directory with head/ and tail/ adapters from fedsplit train"}
    )
    defense: str | None = defense_field(
        DEFENSE_HELP + "; with --adapters and unset: the run's own defence and its trained weights"
    )
    noise: float = field(
        default=0.0,
        metadata={"help": "deprecated: --noise N is --defense gaussian:N (absolute Gaussian noise std)"},
    )
    device: str = device_field("where head and tail run (and the body with --local): auto, cpu, cuda, cuda:N")
    dtype: str = dtype_field()

    def defense_option(self) -> str | None:
        """``--defense``, or the deprecated ``--noise N`` as ``gaussian:N``; ``None`` when neither is given.

        Raises:
            ValueError: both are given.
        """
        if self.noise > 0 and self.defense is not None:
            raise ValueError("give --defense or --noise, not both (--noise N is --defense gaussian:N)")
        if self.noise > 0:
            return f"gaussian:{self.noise}"
        return self.defense
