"""Fine-tuning runs: split (body local or remote) or centralized, same data, same seed, same LoRA."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..model.device import resolve_device, resolve_dtype
from ..model.loading import load_config, load_tokenizer, model_fingerprint
from ..model.lora import add_lora, save_adapter
from ..model.split import body_span, load_client_parts, load_part, num_layers
from ..wire.protocol import SessionConfig
from .config import EvalConfig, TrainConfig
from .core import LocalTransport, SplitClient, lm_loss
from .federated import FederatedTransport, join_federation

if TYPE_CHECKING:
    from ..privacy import Defense

log = logging.getLogger(__name__)

DEFENSE_DIR = "defense"  # in a run folder: defense.json ({"spec": ...}) and defense.safetensors
DEFENSE_SPEC_FILE = "defense.json"
DEFENSE_WEIGHTS = "defense.safetensors"


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists with ``pad_id``: (ids ``[B, T]``, pad lengths ``[B]``)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
    return ids, torch.tensor([width - len(s) for s in sequences], dtype=torch.long)


def special_token_ids(config) -> list[int]:
    """The bos, eos and pad ids of a model config (a ``textdx`` defence never replaces nor picks them)."""
    special = (getattr(config, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id"))
    return sorted({i for ids in special if ids is not None for i in ([ids] if isinstance(ids, int) else ids)})


def client_defense(spec: str | None, head) -> Defense | None:
    """The defence ``spec`` describes (``None`` or "none": none), built for ``head`` and placed beside it.

    ``adv`` and ``mid`` get the head's hidden size, ``textdx`` its input embedding and special ids.
    The spec is taken as it is: resolve a user's option first
    (:func:`fedsplit.privacy.defaults.resolve_defense_spec`).

    Raises:
        ValueError: one line, for a malformed spec or a value out of range.
    """
    from ..privacy import parse_defense

    try:
        defense = parse_defense(
            spec,
            hidden_size=int(head.config.hidden_size),
            embedding=head.embed_tokens.weight.detach(),
            keep_ids=special_token_ids(head.config),
        )
    except ValueError as exc:  # the message ends with the whole grammar: keep its first line
        raise ValueError(f"{str(exc).splitlines()[0]} (grammar: docs/privacy.md)") from None
    if defense is not None:
        defense.to(next(head.parameters()).device)  # a trainable defence (MID, adv) computes beside the head
    return defense


def build_client(cfg: TrainConfig, transport=None, lora: bool = True) -> SplitClient:
    """Head and tail with fresh LoRA (seeded; ``lora=False``: none), a defence, and a transport to the body.

    Head, tail, defence and a body in this process go on ``cfg.device`` in ``cfg.dtype``. The
    defence is ``cfg.defense_spec()`` (``--defense``, ``--noise``, else the default defence); a
    split client without one logs :func:`fedsplit.privacy.defaults.warn_undefended` (once per
    process). A centralized client sends nothing and has no defence.
    """
    from ..privacy.defaults import warn_undefended

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    n = num_layers(load_config(cfg.model))
    p, q = (0, 0) if cfg.centralized else (cfg.head_layers, cfg.tail_layers)
    span = body_span(n, p, q)
    torch.manual_seed(cfg.seed)
    head, tail = load_client_parts(cfg.model, p, q, dtype=dtype, device=device)
    if lora:
        add_lora(head, cfg.lora, seed=cfg.seed)
        add_lora(tail, cfg.lora, seed=cfg.seed)
    if transport is None:
        if cfg.server and not cfg.centralized:
            # a RemoteTransport that can also take part in the server's training mode, if it has one
            transport = FederatedTransport(
                cfg.server,
                token=cfg.token,
                tls_ca=cfg.tls_ca,
                tls_cert=cfg.tls_cert,
                tls_key=cfg.tls_key,
                wire_dtype=cfg.wire_dtype,
                fingerprint=model_fingerprint(cfg.model),
            )
        else:
            transport = LocalTransport(load_part(cfg.model, "body", span=span, dtype=dtype, device=device))
    defense = None
    if not cfg.centralized:
        defense = client_defense(cfg.defense_spec(), head)
        if defense is None:
            warn_undefended(p)
    return SplitClient(head, tail, transport, span, defense=defense)


def run_defense_spec(run_dir: str | Path) -> str | None:
    """The defence a run in ``run_dir`` was trained with: its spec, "none" for none, ``None`` if unknown.

    Read from ``defense/defense.json`` (written by :func:`save_run`), else, for runs saved before
    it, from the options in ``summary.json`` (``defense``, else ``noise``; a split run with neither
    was undefended). A centralized run, or a folder with neither file, gives ``None``.
    """
    run_dir = Path(run_dir)
    spec_file = run_dir / DEFENSE_DIR / DEFENSE_SPEC_FILE
    if spec_file.exists():
        return str(json.loads(spec_file.read_text())["spec"])
    summary = run_dir / "summary.json"
    if not summary.exists():
        return None
    config = json.loads(summary.read_text()).get("config") or {}
    if not config or config.get("centralized"):
        return None
    if config.get("defense"):
        return str(config["defense"])
    if (config.get("noise") or 0) > 0:
        return f"gaussian:{config['noise']}" + (":relative" if config.get("noise_relative") else "")
    return "none"


def defense_option_for_run(option: str | None, run_dir: str | Path) -> str | None:
    """The ``--defense`` value for a client that loads the run in ``run_dir`` (``--adapters``).

    An option the user gave wins. Without one, the run's own defence (:func:`run_defense_spec`,
    "none" when it was trained undefended) is used, so :func:`load_run_adapters` also loads its
    trained weights; if the run records none, ``None``: the default defence applies.
    """
    if option is not None:
        return option
    spec = run_defense_spec(run_dir)
    if spec is not None:
        log.info("defence from the run in %s: %s", run_dir, spec)
    return spec


def save_defense(defense: Defense | None, directory: str | Path) -> None:
    """``directory/defense.json`` ({"spec": the defence's canonical name, or "none"}) and, for a
    defence with parameters or buffers (``adv``, ``mid``), its state in ``defense.safetensors``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec = defense.name if defense is not None else "none"
    (directory / DEFENSE_SPEC_FILE).write_text(json.dumps({"spec": spec}, indent=2) + "\n")
    weights = directory / DEFENSE_WEIGHTS
    state = defense.state_dict() if defense is not None else {}
    if state:
        tensors = {key: value.detach().cpu().clone().contiguous() for key, value in state.items()}
        save_file(tensors, str(weights), metadata={"spec": spec})
    elif weights.exists():  # left by an earlier run in the same folder
        weights.unlink()


def load_run_defense(client: SplitClient, run_dir: str | Path) -> bool:
    """Load the trained defence state of the run in ``run_dir`` into ``client.defense``.

    The state is loaded only when the client's defence is the one the run was trained with
    (same canonical spec); otherwise the run's weights are not used, and a warning says so.
    Returns whether a state was loaded.

    Raises:
        ValueError: the saved state does not fit the client's defence (another model).
    """
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    run_spec = run_defense_spec(run_dir)
    weights = run_dir / DEFENSE_DIR / DEFENSE_WEIGHTS
    ours = client.defense.name if client.defense is not None else "none"
    if run_spec is None or run_spec == ours:
        if not weights.exists() or client.defense is None:
            return False
        try:
            client.defense.load_state_dict(load_file(str(weights)))
        except RuntimeError as exc:
            raise ValueError(
                f"{weights} does not fit the defence {ours}: {str(exc).splitlines()[0]}"
            ) from None
        log.info("loaded the trained state of the defence %s from %s", ours, weights)
        return True
    if weights.exists():
        log.warning(
            "the defence %s differs from the run's %s (%s): the run's trained defence weights are not used",
            ours,
            run_spec,
            run_dir,
        )
    else:
        log.info(
            "the run in %s was trained with the defence %s; this client uses %s", run_dir, run_spec, ours
        )
    return False


def load_run_adapters(client: SplitClient, run_dir: str | Path) -> None:
    """Load head/ and tail/ adapters into the client; body/ is pushed into its inference sessions.

    A trained defence state in defense/ is loaded too when the client's defence is the run's
    (see :func:`load_run_defense`; build the client with :func:`defense_option_for_run` to get it).
    """
    from ..model.lora import load_lora_state_dict, read_adapter

    run_dir = Path(run_dir)
    for name, segment in (("head", client.head), ("tail", client.tail)):
        state, settings = read_adapter(run_dir / name)
        if state:
            add_lora(segment, settings)
            load_lora_state_dict(segment, state)
    state, settings = read_adapter(run_dir / "body")
    client.body_adapter = (settings, state)
    load_run_defense(client, run_dir)


def build_eval_client(cfg: EvalConfig) -> SplitClient:
    """The client ``fedsplit eval`` scores: :meth:`EvalConfig.train_config`, without fresh LoRA.

    With ``cfg.adapters``, the run's adapters are loaded, and its defence is used unless
    ``cfg.defense`` is given (:func:`defense_option_for_run`, :func:`load_run_defense`).
    """
    train_cfg = cfg.train_config()
    if cfg.adapters is not None:
        train_cfg.defense = defense_option_for_run(cfg.defense, cfg.adapters)
    client = build_client(train_cfg, lora=False)
    if cfg.adapters is not None:
        load_run_adapters(client, cfg.adapters)
    return client


def evaluate_client(
    client: SplitClient, task, tokenizer, split: str = "test", max_examples: int = 200
) -> dict:
    from ..tasks import evaluate

    def logits_fn(ids, pad):
        return client.logits(ids, pad)

    def generate_fn(prompts, max_new_tokens):
        ids, pad = left_pad(prompts, tokenizer.pad_token_id)
        out = client.generate(ids, pad, max_new_tokens, tokenizer.eos_token_id)
        return [row.tolist() for row in out]

    was_training = client.defense.training if client.defense is not None else None
    if client.defense is not None:
        client.defense.eval()
    try:
        return evaluate(
            task, tokenizer, logits_fn, generate_fn, split=split, max_examples=max_examples, progress=False
        )
    finally:
        if was_training:
            client.defense.train()


def run_training(
    cfg: TrainConfig, client: SplitClient | None = None, progress: bool = True, evaluate_before: bool = False
) -> dict:
    """Fine-tune; returns a summary (losses, metrics, bytes, seconds). Saves adapters under ``cfg.out``."""
    from tqdm import tqdm

    from ..tasks import iterate_batches, load_task

    cfg.check()
    tokenizer = load_tokenizer(cfg.model)
    task = load_task(cfg.task, max_examples=cfg.max_examples, seed=cfg.seed, path=cfg.data)
    client = client or build_client(cfg)
    summary: dict = {"config": asdict(cfg), "history": []}
    if evaluate_before:
        summary["before"] = evaluate_client(client, task, tokenizer, max_examples=cfg.eval_examples)
        log.info("before training: %s", summary["before"])
    torch.manual_seed(cfg.seed)
    session_config = SessionConfig(
        span=client.span,
        mode="train",
        max_length=cfg.max_length,
        max_batch=cfg.batch_size,
        lora=cfg.lora,
        lr=cfg.lr if cfg.body_lr is None else cfg.body_lr,
        warmup_steps=cfg.body_warmup,
        seed=cfg.seed,
    )
    federation = None if cfg.centralized else join_federation(client, cfg.steps)
    if federation is not None:
        if cfg.checkpoint_every > 0 or cfg.resume:
            raise ValueError(
                f"the server trains in {federation.mode} mode; checkpoints and --resume are for "
                "a client training alone (server mode independent)"
            )
        log.info(
            "the server trains in %s mode; head/tail FedAvg every %d step(s)",
            federation.mode,
            federation.fedavg_every,
        )
    trainer, first = None, 1
    if cfg.checkpoint_every > 0 or cfg.resume:  # fedsplit.client.checkpointing: survives restarts
        trainer = resilient_trainer(cfg, client, session_config, task, tokenizer)
        first = trainer.start(resume=cfg.resume) + 1
    else:
        client.start_training(session_config, lr=cfg.lr)
    traffic = getattr(client.transport, "traffic", None)
    batches = iterate_batches(task.train, tokenizer, cfg.batch_size, seed=cfg.seed, max_length=cfg.max_length)
    start, tokens_seen, sent, received = time.perf_counter(), 0, 0, 0
    bar = tqdm(range(first, cfg.steps + 1), desc="train", disable=not progress, dynamic_ncols=True)
    for step in bar:
        before = (traffic.sent, traffic.received) if traffic is not None else (0, 0)
        if trainer:
            result = trainer.train_step()
        else:
            batch = next(batches)
            if federation is not None:
                federation.before_step(batch)
            result = client.train_step(batch, cfg.clip_norm)
            if federation is not None:
                federation.after_step(step, batch)
        tokens_seen += result.tokens
        elapsed = time.perf_counter() - start
        record = {"step": step, "loss": result.loss, "seconds": elapsed}
        postfix = {"loss": f"{result.loss:.3f}", "tok/s": f"{tokens_seen / elapsed:.0f}"}
        if traffic is not None:  # training steps only; evaluation traffic is not counted
            sent += traffic.sent - before[0]
            received += traffic.received - before[1]
            postfix.update(sent=_mib(sent), recv=_mib(received))
        bar.set_postfix(postfix)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            record["eval"] = evaluate_client(
                client, task, tokenizer, split="val", max_examples=cfg.eval_examples
            )
            log.info("step %d: %s", step, record["eval"])
        summary["history"].append(record)
    summary["train_seconds"] = time.perf_counter() - start
    if federation is not None:
        summary["federation"] = {
            "mode": federation.mode,
            "fedavg_every": federation.fedavg_every,
            "fedavg_rounds": federation.rounds,
        }
    summary["tokens_per_second"] = tokens_seen / summary["train_seconds"]
    if traffic is not None:
        summary["bytes_sent"], summary["bytes_received"] = sent, received
        summary["bytes_per_step"] = (sent + received) / max(len(summary["history"]), 1)
    summary["after"] = evaluate_client(client, task, tokenizer, max_examples=cfg.eval_examples)
    if cfg.out:
        save_run(client, cfg, summary)
    return summary


def resilient_trainer(cfg: TrainConfig, client: SplitClient, session_config: SessionConfig, task, tokenizer):
    """A :class:`~fedsplit.client.checkpointing.ResilientTrainer` checkpointing under ``cfg.out/checkpoints``."""
    from dataclasses import replace

    from ..tasks import iterate_batches
    from .checkpointing import ClientCheckpointer, ResilientTrainer, run_id_for

    if not cfg.out:
        raise ValueError("checkpoints need an output directory (--out)")
    run_id = run_id_for(cfg.out, cfg.resume, cfg.run_id)
    return ResilientTrainer(
        client,
        replace(session_config, run_id=run_id),
        lambda: iterate_batches(
            task.train, tokenizer, cfg.batch_size, seed=cfg.seed, max_length=cfg.max_length
        ),
        ClientCheckpointer(Path(cfg.out) / "checkpoints", cfg.checkpoint_every),
        lr=cfg.lr,
        clip_norm=cfg.clip_norm,
    )


def save_run(client: SplitClient, cfg: TrainConfig, summary: dict) -> Path:
    """head/, body/, tail/ adapters (peft format) + summary.json; `fedsplit export` reads this layout.

    A split run also gets defense/ (:func:`save_defense`): the defence's spec and, for a trained
    one, its state, which ``--adapters`` picks up later (:func:`load_run_adapters`).
    """
    out = Path(cfg.out)
    meta = {"model": cfg.model, "head_layers": cfg.head_layers, "tail_layers": cfg.tail_layers}
    save_adapter(client.head, out / "head", cfg.lora, **meta)
    save_adapter(client.tail, out / "tail", cfg.lora, **meta)
    session = client.train_session
    if hasattr(session, "adapter_state"):
        settings, state = session.adapter_state()
        body_dir = out / "body"
        save_adapter(None, body_dir, settings, state=state, **meta)
    if not cfg.centralized:
        save_defense(client.defense, out / DEFENSE_DIR)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    log.info("saved adapters and summary to %s", out)
    return out


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}MiB"


def centralized_loss(model, batch) -> torch.Tensor:
    device = next(model.parameters()).device
    return lm_loss(model(batch["input_ids"].to(device)).logits, batch["labels"].to(device))
