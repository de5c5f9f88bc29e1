"""Fine-tuning runs: split (body local or remote) or centralized, same data, same seed, same LoRA."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..model.device import resolve_device, resolve_dtype
from ..model.loading import load_config, load_tokenizer, model_fingerprint
from ..model.lora import add_lora, save_adapter
from ..model.split import body_span, load_client_parts, load_part, num_layers
from ..wire.protocol import SessionConfig
from .config import TrainConfig
from .core import LocalTransport, SplitClient, lm_loss
from .federated import FederatedTransport, join_federation

log = logging.getLogger(__name__)


def build_client(cfg: TrainConfig, transport=None, lora: bool = True) -> SplitClient:
    """Head and tail with fresh LoRA (seeded; ``lora=False``: none), a defence, and a transport to the body.

    Head, tail, defence and a body in this process go on ``cfg.device`` in ``cfg.dtype``.
    """
    from ..privacy import parse_defense

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
                wire_dtype=cfg.wire_dtype,
                fingerprint=model_fingerprint(cfg.model),
            )
        else:
            transport = LocalTransport(load_part(cfg.model, "body", span=span, dtype=dtype, device=device))
    defense = None
    if not cfg.centralized:
        special = (
            getattr(head.config, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")
        )
        keep = sorted(
            {i for ids in special if ids is not None for i in ([ids] if isinstance(ids, int) else ids)}
        )
        defense = parse_defense(
            cfg.defense_spec(),
            hidden_size=int(head.config.hidden_size),
            embedding=head.embed_tokens.weight.detach(),
            keep_ids=keep,
        )
    if defense is not None:
        defense.to(device)  # a trainable defence (MID) computes beside the head
    return SplitClient(head, tail, transport, span, defense=defense)


def load_run_adapters(client: SplitClient, run_dir: str | Path) -> None:
    """Load head/ and tail/ adapters into the client; body/ is pushed into its inference sessions."""
    from ..model.lora import load_lora_state_dict, read_adapter

    run_dir = Path(run_dir)
    for name, segment in (("head", client.head), ("tail", client.tail)):
        state, settings = read_adapter(run_dir / name)
        if state:
            add_lora(segment, settings)
            load_lora_state_dict(segment, state)
    state, settings = read_adapter(run_dir / "body")
    client.body_adapter = (settings, state)


def evaluate_client(
    client: SplitClient, task, tokenizer, split: str = "test", max_examples: int = 200
) -> dict:
    from ..tasks import evaluate

    def logits_fn(ids, pad):
        return client.logits(ids, pad)

    def generate_fn(prompts, max_new_tokens):
        from .api import left_pad

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
    """head/, body/, tail/ adapters (peft format) + summary.json; `fedsplit export` reads this layout."""
    out = Path(cfg.out)
    meta = {"model": cfg.model, "head_layers": cfg.head_layers, "tail_layers": cfg.tail_layers}
    save_adapter(client.head, out / "head", cfg.lora, **meta)
    save_adapter(client.tail, out / "tail", cfg.lora, **meta)
    session = client.train_session
    if hasattr(session, "adapter_state"):
        settings, state = session.adapter_state()
        body_dir = out / "body"
        save_adapter(None, body_dir, settings, state=state, **meta)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    log.info("saved adapters and summary to %s", out)
    return out


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}MiB"


def centralized_loss(model, batch) -> torch.Tensor:
    device = next(model.parameters()).device
    return lm_loss(model(batch["input_ids"].to(device)).logits, batch["labels"].to(device))
