"""`fedsplit demo`: a server on loopback, split fine-tuning with noise, accuracy before/after, generation,
and how much of the client's text a curious server reads back (:func:`fedsplit.attacks.audit.audit_client`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ..attacks.audit import AuditReport, audit_client, default_public_texts
from ..attacks.tiers import TierConfig
from ..client.api import SplitModelForCausalLM
from ..client.config import TrainConfig
from ..client.train import build_client, run_training
from ..model.loading import load_tokenizer
from ..wire.protocol import SessionConfig
from .config import DemoConfig
from .procs import placement_args, server_process

log = logging.getLogger(__name__)
QUESTION = "What is the capital of France?"
AUDIT_PROMPTS, AUDIT_KNOWN = 20, 4  # the attacker knows 4 of the test prompts and attacks the other 16
AUDIT_BUDGET = TierConfig(probe_steps=100, finetune_steps=20)


def run_demo(cfg: DemoConfig) -> dict:
    """Start a server, fine-tune through it with noise, score before and after, generate; print a table."""
    model, steps, noise, out = cfg.model, cfg.steps, cfg.noise, Path(cfg.out)
    console = Console()
    started = time.perf_counter()
    console.rule("[bold]fedsplit demo")
    with server_process(model, *placement_args(cfg.device, cfg.dtype)) as (address, _):
        console.print(
            f"server: `fedsplit serve --model {model}` on {address} (holds the body; never sees text)"
        )
        train = TrainConfig(
            model=model,
            server=address,
            head_layers=2,
            tail_layers=2,
            task="sentiment",
            steps=steps,
            batch_size=cfg.batch_size,
            lr=3e-4,
            max_length=96,
            noise=noise,
            noise_relative=True,
            eval_examples=cfg.eval_examples,
            out=str(out),
            device=cfg.device,
            dtype=cfg.dtype,
        )
        client = build_client(train)
        console.print(
            f"client: head = embedding + blocks [0, 2), tail = blocks [{client.span[1]}, "
            f"{client.span[1] + 2}) + LM head; noise {noise} x RMS on every hidden state sent"
        )
        summary = run_training(train, client, evaluate_before=True)
        traffic = client.transport.traffic

        # Generation through the same server, with the fine-tuned body adapter.
        tokenizer = load_tokenizer(model)
        lm = SplitModelForCausalLM(client, tokenizer, model, 2, 2)
        ids, pad = lm.encode_chat([QUESTION])
        settings, state = client.train_session.adapter_state()
        session = client.transport.open(
            SessionConfig(span=client.span, mode="generate", max_length=ids.shape[1] + 48)
        )
        session.put_adapter(settings, state)
        traffic.reset()
        with torch.no_grad():
            new = client.generate(ids, pad, 1, tokenizer.eos_token_id, session=session)
        prefill_bytes = traffic.sent + traffic.received
        session.close()
        session = client.transport.open(
            SessionConfig(span=client.span, mode="generate", max_length=ids.shape[1] + 48)
        )
        session.put_adapter(settings, state)
        traffic.reset()
        with torch.no_grad():
            new = client.generate(ids, pad, 40, tokenizer.eos_token_id, session=session)
        decode_bytes = traffic.sent + traffic.received - prefill_bytes
        session.close()
        answer = tokenizer.decode(new[0], skip_special_tokens=True).strip()
        console.print(
            f"auditing: a curious server attacks what the client sent for {AUDIT_PROMPTS} test prompts"
        )
        audit = demo_audit(client, train, tokenizer)
    metric = next(iter(summary["after"]))
    table = Table(title="fedsplit demo")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row(f"sentiment {metric} before", f"{summary['before'][metric]:.3f}")
    table.add_row(f"sentiment {metric} after {steps} steps", f"{summary['after'][metric]:.3f}")
    reads = round(100 * audit.tier("public").strongest.token_f1)
    table.add_row("curious server reads (public tier)", f"~{reads} % of tokens")
    table.add_row("training time", f"{summary['train_seconds']:.0f} s")
    table.add_row("bytes on the wire per training step", f"{summary['bytes_per_step'] / 1024:.1f} KiB")
    per_token = decode_bytes / max(new.shape[1] - 1, 1)
    table.add_row("bytes on the wire per generated token", f"{per_token:.0f} B (both directions)")
    table.add_row("total time", f"{time.perf_counter() - started:.0f} s")
    console.print(f"\n[bold]Q:[/bold] {QUESTION}\n[bold]A:[/bold] {answer}\n")
    console.print(table)
    console.print(f"adapters saved in {out} (fedsplit export --adapters {out} --out merged)")
    return {
        "summary": summary,
        "answer": answer,
        "bytes_per_token": per_token,
        "server_reads_percent": reads,
        "audit": audit.as_dict(),
    }


def demo_audit(client, train: TrainConfig, tokenizer) -> AuditReport:
    """:func:`~fedsplit.attacks.audit.audit_client` on test prompts of the demo's task, on a small budget
    (probe and nearest-neighbour attacks, public dialogue text); the demo reports its public tier."""
    from ..tasks import load_task

    prompts = [
        ex.prompt for ex in load_task(train.task, max_examples=4 * AUDIT_PROMPTS, seed=train.seed).test
    ]
    return audit_client(
        client,
        tokenizer,
        prompts[:AUDIT_PROMPTS],
        spec=train.model,
        head_layers=train.head_layers,
        public_texts=default_public_texts(256, seed=train.seed),
        defense_spec=train.defense_spec(),
        n=AUDIT_PROMPTS,
        k=AUDIT_KNOWN,
        attacks=("probe-tied",),
        tier_config=AUDIT_BUDGET,
        seed=train.seed,
        progress=False,
        wire_dtype=train.wire_dtype,
    )
