"""Privacy-utility: what each attack recovers under each defence, and what the defence costs the task.

Privacy comes from :mod:`fedsplit.attacks` (token F1 of the reconstruction, or label
accuracy); utility from :mod:`fedsplit.tasks` — the split model's answer negative
log-likelihood and label-word accuracy on the task with the defence applied to the
hidden states it sends, against the same model with no defence.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from pathlib import Path

import torch

from ..attacks.runner import evaluate_attack
from ..client.core import LocalTransport, SplitClient
from ..model.loading import load_config, load_tokenizer
from ..model.split import body_span, load_client_parts, load_part, num_layers
from ..privacy import parse_defense

log = logging.getLogger(__name__)

# (attack, defence spec) grid; strengths chosen around the hidden-state scale (relative noise).
QUICK_GRID = {
    "attacks": ["vmi"],
    "defenses": ["none", "gaussian:0.1:relative", "gaussian:0.5:relative", "sparsify:0.2", "laplace:0.3:relative"],
    "head_layers": [1, 2],
    "n": 16,
    "utility_n": 16,
}
FULL_GRID = {
    "attacks": ["vmi", "learned", "relaxation"],
    "defenses": ["none", "gaussian:0.05:relative", "gaussian:0.2:relative", "gaussian:0.5:relative",
                 "gaussian:1.0:relative", "laplace:0.3:relative", "sparsify:0.5", "sparsify:0.1",
                 "dp:clip=50,sigma=0.5"],
    "head_layers": [1, 2, 4],
    "n": 64,
    "utility_n": 48,
}


@functools.lru_cache(maxsize=4)
def _frozen_parts(spec: str, head_layers: int, tail_layers: int):
    """Base-model head, tail and body for utility scoring (no adapters: safe to share across calls)."""
    span = body_span(num_layers(load_config(spec)), head_layers, tail_layers)
    head, tail = load_client_parts(spec, head_layers, tail_layers)
    return head, tail, load_part(spec, "body", span=span), span


@functools.lru_cache(maxsize=4)
def _task(name: str, seed: int):
    from ..tasks import load_task

    return load_task(name, seed=seed)


def utility(spec: str, head_layers: int, defense_spec: str | None, task: str = "sentiment", n: int = 48,
            seed: int = 0, tail_layers: int = 2) -> dict:
    """Task metrics of the split base model with ``defense_spec`` on what the client sends."""
    from ..tasks import answer_log_likelihoods, encode_example, pad_id_of, predict_label_words

    tokenizer = load_tokenizer(spec)
    head, tail, body, span = _frozen_parts(spec, head_layers, tail_layers)
    defense = parse_defense(defense_spec, hidden_size=int(head.config.hidden_size))
    if defense is not None:
        defense.eval()
    client = SplitClient(head, tail, LocalTransport(body), span, defense=defense)
    task_obj = _task(task, seed)
    examples = task_obj.test[:n]
    torch.manual_seed(seed)
    scores = answer_log_likelihoods([encode_example(tokenizer, ex, 128) for ex in examples], client.logits,
                                    pad_id_of(tokenizer))
    nll = -sum(s for s, _ in scores) / max(sum(c for _, c in scores), 1)
    result = {"nll": nll}
    if task_obj.label_words:
        preds = predict_label_words(examples, tokenizer, client.logits, task_obj.label_words)
        result["accuracy"] = sum(int(p == ex.label) for p, ex in zip(preds, examples)) / len(examples)
    return result


def attack_with_cost(attack: str, defense: str | None, head_layers: int = 2, task: str = "sentiment",
                     n: int = 200, spec: str = "smollm2-135m", seed: int = 0, quick: bool = False,
                     utility_n: int = 48) -> dict:
    """`fedsplit attack`: the attack's scores plus the defence's utility cost (vs no defence)."""
    result = evaluate_attack(attack, spec=spec, head_layers=head_layers, defense_spec=defense, task=task, n=n,
                             seed=seed, quick=quick)
    row = result.as_dict()
    clean = utility(spec, head_layers, None, task, utility_n, seed)
    defended = utility(spec, head_layers, defense, task, utility_n, seed) if defense not in (None, "none") else clean
    for key in clean:
        row[f"utility_{key}"] = defended[key]
        row[f"utility_{key}_clean"] = clean[key]
    row["utility_nll_increase"] = defended["nll"] - clean["nll"]
    return row


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both axes (lower leakage, higher utility)."""
    keep = []
    for i, (leak, util) in enumerate(points):
        dominated = any(l2 <= leak and u2 >= util and (l2, u2) != (leak, util) for l2, u2 in points)
        if not dominated:
            keep.append(i)
    return keep


def sweep(quick: bool = True, spec: str = "smollm2-135m", task: str = "sentiment", out: Path | None = None,
          seed: int = 0) -> dict:
    """attacks × defences × p; writes privacy.json, privacy.md and one PNG per attack."""
    grid = QUICK_GRID if quick else FULL_GRID
    started = time.perf_counter()
    rows, utilities = [], {}
    for p in grid["head_layers"]:
        for defense in grid["defenses"]:
            key = (p, defense)
            utilities[key] = utility(spec, p, None if defense == "none" else defense, task, grid["utility_n"], seed)
            for attack in grid["attacks"]:
                result = evaluate_attack(attack, spec=spec, head_layers=p, task=task, n=grid["n"], seed=seed,
                                         defense_spec=None if defense == "none" else defense, quick=quick,
                                         progress=False)
                row = {**result.as_dict(), "defense": defense, "head_layers": p,
                       **{f"utility_{k}": v for k, v in utilities[key].items()}}
                rows.append(row)
                log.info("privacy %s p=%d %s: F1 %.3f, utility %s", attack, p, defense,
                         row.get("token_f1", float("nan")), utilities[key])
    summary = {"rows": rows, "seconds": time.perf_counter() - started, "quick": quick, "model": spec}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "privacy.json").write_text(json.dumps(summary, indent=2))
        (out / "privacy.md").write_text(_markdown(rows))
        for attack in grid["attacks"]:
            _plot([r for r in rows if r["attack"] == attack], out / f"privacy_{attack}.png", attack)
    return summary


def _markdown(rows: list[dict]) -> str:
    lines = ["| attack | p | defence | token F1 | ROUGE-L | utility NLL | utility accuracy |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['attack']} | {r['head_layers']} | {r['defense']} | {r.get('token_f1', math.nan):.3f} | "
                     f"{r.get('rougeL', math.nan):.3f} | {r['utility_nll']:.3f} | {r.get('utility_accuracy', math.nan):.3f} |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path, attack: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for p in sorted({r["head_layers"] for r in rows}):
        sub = [r for r in rows if r["head_layers"] == p]
        leak = [r.get("token_f1", 0.0) for r in sub]
        util = [-r["utility_nll"] for r in sub]
        ax.scatter(leak, util, label=f"p = {p}")
        for r, x, y in zip(sub, leak, util):
            ax.annotate(r["defense"].replace(":relative", "r"), (x, y), fontsize=6)
        front = sorted(pareto(list(zip(leak, util))), key=lambda i: leak[i])
        ax.plot([leak[i] for i in front], [util[i] for i in front], "--", linewidth=1)
    ax.set_xlabel(f"{attack}: token F1 of the reconstruction (privacy leaked)")
    ax.set_ylabel("utility: -NLL of the task answers")
    ax.set_title("privacy-utility (dashed: Pareto frontier)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
