"""`fedsplit bench quality`: centralized vs split (no noise) vs split (default noise), same seed and data."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..client.config import TrainConfig
from ..client.train import build_client, evaluate_client, run_training
from ..model.loading import load_tokenizer
from .config import QualityBenchConfig
from .procs import placement_args, server_process

log = logging.getLogger(__name__)

HEADLINE = ("accuracy", "rougeL", "f1", "perplexity")  # the metric the comparison is made on, by task kind


def run(cfg: QualityBenchConfig) -> dict:
    """Untrained, centralized, split and split+noise runs with one seed; one flat dict of figures."""
    from ..tasks import load_task

    model, task, steps, batch_size, seed = cfg.model, cfg.task, cfg.steps, cfg.batch_size, cfg.seed
    lr, eval_examples, max_length, noise = cfg.lr, cfg.eval_examples, cfg.max_length, cfg.noise
    wire_dtype, head_layers, tail_layers = cfg.wire_dtype, cfg.head_layers, cfg.tail_layers
    out = Path(cfg.out) if cfg.out else None
    base = dict(
        model=model,
        task=task,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        eval_examples=eval_examples,
        max_length=max_length,
        wire_dtype=wire_dtype,
        head_layers=head_layers,
        tail_layers=tail_layers,
        device=cfg.device,
        dtype=cfg.dtype,
    )
    rows = {}
    untrained = build_client(TrainConfig(**base, centralized=True))
    metrics = evaluate_client(
        untrained, load_task(task, seed=seed), load_tokenizer(model), max_examples=eval_examples
    )
    rows["untrained"] = {**metrics, "train_seconds": 0.0}
    del untrained
    runs = [
        ("centralized", dict(centralized=True)),
        ("split", dict()),
        ("split+noise", dict(noise=noise, noise_relative=True)),
    ]
    with server_process(model, *placement_args(cfg.device, cfg.dtype)) as (address, _):
        for name, extra in runs:
            cfg = TrainConfig(
                **base,
                **extra,
                server=None if extra.get("centralized") else address,
                out=str(out / name) if out else None,
            )
            log.info("bench quality: %s", name)
            summary = run_training(cfg)
            rows[name] = {
                **summary["after"],
                "train_seconds": summary["train_seconds"],
                "final_loss": summary["history"][-1]["loss"],
            }
    metrics = [k for k in rows["centralized"] if k not in ("train_seconds", "final_loss")]
    metric = next((k for k in HEADLINE if k in metrics), metrics[0])
    flat = {
        "model": model,
        "task": task,
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "metric": metric,
        "noise": noise,
        "eval_examples": eval_examples,
        "head_layers": head_layers,
        "tail_layers": tail_layers,
        "wire_dtype": wire_dtype,
    }
    for name, row in rows.items():
        key = name.replace("+", "_")
        flat[f"{key}_{metric}"] = row[metric]
        flat[f"{key}_seconds"] = row["train_seconds"]
        flat.update({f"{key}_{m}": row[m] for m in metrics if m != metric})  # e.g. ROUGE-1/2 beside ROUGE-L
    flat["split_minus_centralized"] = flat[f"split_{metric}"] - flat[f"centralized_{metric}"]
    flat["split_noise_minus_centralized"] = flat[f"split_noise_{metric}"] - flat[f"centralized_{metric}"]
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "quality.json").write_text(json.dumps(flat, indent=2))
        lines = [f"| run | {metric} | train seconds |", "| --- | ---: | ---: |"]
        lines += [f"| {n} | {r[metric]:.4f} | {r['train_seconds']:.0f} |" for n, r in rows.items()]
        (out / "quality.md").write_text("\n".join(lines) + "\n")
    return flat
