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
from .config import AttackConfig, PrivacyBenchConfig

log = logging.getLogger(__name__)

# The sweep's grids. Hidden-state defences are relative to each token's RMS so one strength means
# the same signal-to-noise ratio at every p; gradient defences are relative to the batch's largest
# token gradient norm. Sizes keep `--quick` under 5 minutes and the full sweep under 60 on 2 cores.
QUICK_GRID = {
    "attacks": ["vmi"],
    "defenses": ["none", "gaussian:0.5:relative", "sparsify:0.1", "laplace:0.5:relative"],
    "head_layers": [1, 2],
    "n": 16,
    "utility_n": 16,
    "label_defenses": ["none", "gaussian:1:relative"],
    "label_n": 24,
    "quick": True,
}
FULL_GRID = {
    "attacks": ["vmi", "learned"],
    "defenses": [
        "none",
        "gaussian:0.25:relative",
        "gaussian:1:relative",
        "gaussian:4:relative",
        "laplace:1:relative",
        "sparsify:0.1",
        "dp:clip=50,sigma=0.05",
        "dx:20",
    ],
    # the learned attacker trains an inverter per (p, defence): the strongest defences only
    "defenses_of": {
        "learned": ["none", "gaussian:1:relative", "gaussian:4:relative", "dp:clip=50,sigma=0.05"]
    },
    "head_layers": [1, 2, 4],
    "n": 32,
    "utility_n": 48,
    "extra": [("relaxation", 1, "none"), ("relaxation", 1, "gaussian:1:relative")],
    "label_defenses": [
        "none",
        "gaussian:0.03:relative",
        "gaussian:0.1:relative",
        "gaussian:0.3:relative",
        "gaussian:1:relative",
    ],
    "label_n": 64,
    "quick": False,
}


@functools.lru_cache(maxsize=4)
def _frozen_parts(spec: str, head_layers: int, tail_layers: int, device: str = "auto", dtype: str = "auto"):
    """Base-model head, tail and body for utility scoring (no adapters: safe to share across calls)."""
    span = body_span(num_layers(load_config(spec)), head_layers, tail_layers)
    head, tail = load_client_parts(spec, head_layers, tail_layers, dtype=dtype, device=device)
    return head, tail, load_part(spec, "body", span=span, dtype=dtype, device=device), span


@functools.lru_cache(maxsize=4)
def _task(name: str, seed: int):
    from ..tasks import load_task

    return load_task(name, seed=seed)


def utility(
    spec: str,
    head_layers: int,
    defense_spec: str | None,
    task: str = "sentiment",
    n: int = 48,
    seed: int = 0,
    tail_layers: int = 2,
    device: str = "auto",
    dtype: str = "auto",
) -> dict:
    """Task metrics of the split base model with ``defense_spec`` on what the client sends.

    ``nll`` of the answers; on a classification task also ``accuracy`` and ``macro_f1``.
    The model computes on ``device`` in ``dtype``.
    """
    from ..tasks import answer_log_likelihoods, encode_example, pad_id_of, scores_by_label_words

    tokenizer = load_tokenizer(spec)
    head, tail, body, span = _frozen_parts(spec, head_layers, tail_layers, device, dtype)
    defense = parse_defense(defense_spec, hidden_size=int(head.config.hidden_size))
    if defense is not None:
        defense.eval().to(next(head.parameters()).device)
    client = SplitClient(head, tail, LocalTransport(body), span, defense=defense)
    task_obj = _task(task, seed)
    examples = task_obj.test[:n]
    torch.manual_seed(seed)
    scores = answer_log_likelihoods(
        [encode_example(tokenizer, ex, 128) for ex in examples], client.logits, pad_id_of(tokenizer)
    )
    nll = -sum(s for s, _ in scores) / max(sum(c for _, c in scores), 1)
    result = {"nll": nll}
    if task_obj.label_words:
        result.update(scores_by_label_words(examples, tokenizer, client.logits, task_obj.label_words))
    return result


def attack_with_cost(cfg: AttackConfig) -> dict:
    """`fedsplit attack`: the attack's scores plus the defence's utility cost (vs no defence).

    ``grad_defense`` (label attack only) is the defence on the gradient the client sends; its cost
    is reported as ``utility_grad_cosine``, the cosine of the sent gradient with the clean one.
    """
    attack, defense, grad_defense, spec, seed = cfg.attack, cfg.defense, cfg.grad_defense, cfg.model, cfg.seed
    head_layers, task, utility_n = cfg.head_layers, cfg.task, cfg.utility_examples
    if grad_defense not in (None, "none") and attack != "label":
        raise ValueError("--grad-defense applies to the label attack only (the gradient is what it observes)")
    result = evaluate_attack(
        attack,
        spec=spec,
        head_layers=head_layers,
        defense_spec=defense,
        task=task,
        n=cfg.n,
        seed=seed,
        quick=cfg.quick,
        grad_defense_spec=grad_defense,
        device=cfg.device,
        dtype=cfg.dtype,
    )
    row = result.as_dict()
    place = {"device": cfg.device, "dtype": cfg.dtype}
    if attack == "label":
        cost = gradient_utility(spec, grad_defense, task, seed=seed, **place)
        row.update({f"utility_{k}": v for k, v in cost.items()})
    clean = utility(spec, head_layers, None, task, utility_n, seed, **place)
    defended = (
        utility(spec, head_layers, defense, task, utility_n, seed, **place)
        if defense not in (None, "none")
        else clean
    )
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


def gradient_utility(
    spec: str,
    grad_defense: str | None,
    task: str = "sentiment",
    n: int = 16,
    seed: int = 0,
    head_layers: int = 2,
    tail_layers: int = 2,
    device: str = "auto",
    dtype: str = "auto",
) -> dict:
    """How much of the training signal survives a gradient defence: cosine of clean vs sent gradients.

    The gradients are the ones the client sends the server for ``n`` training examples of the
    task (w.r.t. the body output, answer-only loss), flattened per batch of 8.
    """
    from ..attacks.label import victim_gradients
    from ..privacy import parse_grad_defense
    from ..tasks import collate, encode_example, pad_id_of

    defense = parse_grad_defense(grad_defense)
    if defense is None:
        return {"grad_cosine": 1.0}
    tokenizer = load_tokenizer(spec)
    head, tail, body, _ = _frozen_parts(spec, head_layers, tail_layers, device, dtype)
    batch = collate(
        [encode_example(tokenizer, ex, 128) for ex in _task(task, seed).train[:n]], pad_id_of(tokenizer)
    )
    clean = victim_gradients(
        head, body, tail, batch["input_ids"], batch["labels"], batch["pad_lengths"], progress=False
    )
    torch.manual_seed(seed)
    cosines = []
    for start in range(0, clean.shape[0], 8):
        g = clean[start : start + 8]
        cosines.append(float(torch.nn.functional.cosine_similarity(g.flatten(), defense(g).flatten(), dim=0)))
    return {"grad_cosine": sum(cosines) / len(cosines)}


def _jobs(grid: dict) -> list[tuple[str, int, str]]:
    only = grid.get("defenses_of", {})
    jobs = [
        (attack, p, defense)
        for p in grid["head_layers"]
        for defense in grid["defenses"]
        for attack in grid["attacks"]
        if defense in only.get(attack, grid["defenses"])
    ]
    jobs += list(grid.get("extra", []))
    jobs += [("label", 2, defense) for defense in grid.get("label_defenses", [])]
    return jobs


def sweep(cfg: PrivacyBenchConfig, grid: dict | None = None, progress: bool = True) -> dict:
    """attacks × defences × p (and label inference × gradient defences); writes privacy.json,
    privacy.md and one PNG per attack."""
    from tqdm.auto import tqdm

    quick, spec, task, seed = cfg.quick, cfg.model, cfg.task, cfg.seed
    place = {"device": cfg.device, "dtype": cfg.dtype}
    out = Path(cfg.out) if cfg.out else None
    grid = grid or (QUICK_GRID if quick else FULL_GRID)
    started = time.perf_counter()
    rows, utilities = [], {}
    jobs = _jobs(grid)
    bar = tqdm(jobs, desc="privacy sweep", unit="run", disable=not progress)
    for attack, p, defense in bar:
        bar.set_postfix_str(f"{attack} p={p} {defense}")
        if attack == "label":
            key = ("grad", defense)
            if key not in utilities:
                utilities[key] = gradient_utility(spec, defense, task, seed=seed, **place)
            result = evaluate_attack(
                "label",
                spec=spec,
                head_layers=p,
                task=task,
                n=grid["label_n"],
                seed=seed,
                grad_defense_spec=defense,
                progress=False,
                **place,
            )
        else:
            key = (p, defense)
            if key not in utilities:
                utilities[key] = utility(spec, p, defense, task, grid["utility_n"], seed, **place)
            result = evaluate_attack(
                attack,
                spec=spec,
                head_layers=p,
                task=task,
                n=grid["n"],
                seed=seed,
                defense_spec=defense,
                quick=grid["quick"],
                progress=False,
                **place,
            )
        row = {
            **result.as_dict(),
            "defense": defense,
            "head_layers": p,
            **{f"utility_{k}": v for k, v in utilities[key].items()},
        }
        rows.append(row)
        log.info(
            "privacy %s p=%d %s: %s, utility %s",
            attack,
            p,
            defense,
            {k: row[k] for k in ("token_f1", "label_accuracy") if k in row},
            utilities[key],
        )
    bar.close()
    summary = {
        "rows": rows,
        "seconds": time.perf_counter() - started,
        "quick": quick,
        "model": spec,
        "task": task,
        "n": grid["n"],
        "label_n": grid.get("label_n"),
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "privacy.json").write_text(json.dumps(summary, indent=2))
        (out / "privacy.md").write_text(_markdown(rows))
        for attack in sorted({r["attack"] for r in rows}):
            _plot([r for r in rows if r["attack"] == attack], out / f"privacy_{attack}.png", attack)
    return summary


def _markdown(rows: list[dict]) -> str:
    lines = []
    inversion = [r for r in rows if r["attack"] != "label"]
    if inversion:
        lines += [
            "| attack | p | defence | token F1 | ROUGE-L | BLEU-4 | utility NLL | utility accuracy | seconds |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {r['attack']} | {r['head_layers']} | {r['defense']} | {r.get('token_f1', math.nan):.3f} | "
            f"{r.get('rougeL', math.nan):.3f} | {r.get('bleu4', math.nan):.3f} | {r['utility_nll']:.3f} | "
            f"{r.get('utility_accuracy', math.nan):.3f} | {r.get('seconds', math.nan):.0f} |"
            for r in inversion
        ]
    label = [r for r in rows if r["attack"] == "label"]
    if label:
        lines += [
            "",
            "| attack | gradient defence | label accuracy | AUC | gradient cosine (utility) | seconds |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| label | {r['defense']} | {r['label_accuracy']:.3f} | {r['auc']:.3f} | "
            f"{r['utility_grad_cosine']:.3f} | {r.get('seconds', math.nan):.0f} |"
            for r in label
        ]
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path, attack: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = attack == "label"
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for p in sorted({r["head_layers"] for r in rows}):
        sub = [r for r in rows if r["head_layers"] == p]
        leak = [r.get("label_accuracy" if label else "token_f1", 0.0) for r in sub]
        util = [r["utility_grad_cosine"] if label else -r["utility_nll"] for r in sub]
        ax.scatter(leak, util, label=f"p = {p}")
        for r, x, y in zip(sub, leak, util):
            ax.annotate(r["defense"].replace(":relative", "r"), (x, y), fontsize=6)
        front = sorted(pareto(list(zip(leak, util))), key=lambda i: leak[i])
        ax.plot([leak[i] for i in front], [util[i] for i in front], "--", linewidth=1)
    if label:
        ax.set_xlabel("label: accuracy of the inferred labels (privacy leaked)")
        ax.set_ylabel("utility: cosine of sent vs clean gradient")
    else:
        ax.set_xlabel(f"{attack}: token F1 of the reconstruction (privacy leaked)")
        ax.set_ylabel("utility: -NLL of the task answers")
    ax.set_title("privacy-utility (dashed: Pareto frontier)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
