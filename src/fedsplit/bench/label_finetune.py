"""`fedsplit bench privacy --after-finetune --labels`: gradient defences judged on the model they protect.

For every configuration (task, p, gradient defence, hidden-state defence):

1. **Fine-tune** the split model over a real gRPC session with both defences on, the same steps,
   seed, data and order as every other configuration (the fine-tuning of
   :func:`fedsplit.bench.privacy_finetune.fine_tune`, with its :class:`~fedsplit.bench.privacy_finetune.Budget`).
   The task metric is the fine-tuned model's against the fine-tuned undefended model's.
2. **Capture** at the *server side* every gradient the client sends back during that fine-tuning,
   as the server decoded it (after the gradient defence and the wire dtype): exactly what a curious
   operator can record.
3. **Attack** those gradients with the label inference of :mod:`fedsplit.attacks.label`: the attacker
   knows the labels of ``known_labels`` training examples per class (as
   :func:`~fedsplit.attacks.label.evaluate_label_attack` assumes) and guesses the rest. Every method
   (``cluster``, ``classifier``; ``norm`` too for two classes) runs on two views of where the answer
   is — the row's largest gradient (``argmax``, the module's own) and the column whose gradient is
   largest over the whole batch (``column``: left padding lines the answers up, and averaging over
   the batch locates them through noise) — and the strongest on the scored examples is reported,
   next to chance (the majority-class rate of the scored examples).

Rows are appended to ``labels.jsonl`` in the output folder as they finish, and a finished row is
skipped when the command runs again. ``labels.md`` and ``labels.json`` are rewritten from all rows
after each one.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..attacks.label import evaluate_label_attack, gradient_features, infer_labels
from ..attacks.metrics import accuracy, auc
from . import privacy_finetune as ft
from .config import PrivacyBenchConfig

log = logging.getLogger(__name__)

# The attacker's known labels per class: the label attack's own default.
KNOWN_LABELS: int = inspect.signature(evaluate_label_attack).parameters["known_labels"].default

Job = tuple[str, int, str, str]  # (task, p, gradient defence, hidden-state defence)


@dataclass(frozen=True)
class LabelGrid:
    """The configurations of one sweep, in the order they run, and what each gets."""

    budget: ft.Budget  # steps, batch size, lr, max length, eval examples (the attack fields are unused)
    jobs: tuple[Job, ...]
    known_labels: int = KNOWN_LABELS  # per class


FULL_JOBS: tuple[Job, ...] = (
    ("sentiment", 2, "none", "none"),
    ("sentiment", 2, "gaussian:0.1:relative", "none"),
    ("sentiment", 2, "gaussian:0.3:relative", "none"),
    ("sentiment", 2, "gaussian:1:relative", "none"),
    ("sentiment", 2, "none", "textdx:4+bypass"),
    ("sentiment", 2, "gaussian:0.3:relative", "textdx:4+bypass"),
)
FULL_GRID = LabelGrid(ft.FULL_GRID.budget, FULL_JOBS)
QUICK_GRID = LabelGrid(
    ft.QUICK_GRID.budget,
    (("sentiment", 2, "none", "none"), ("sentiment", 2, "gaussian:0.3:relative", "none")),
)
BUDGET_FIELDS = ("steps", "batch_size", "lr", "max_length", "eval_examples")


def job_key(task: str, p: int, grad: str, defense: str) -> str:
    return f"{task}|p={p}|grad={grad}|defense={defense}"


def _is_none(spec: str) -> bool:
    return spec.strip().lower() in ("", "none")


def parse_grad_configs(text: str, task: str, p: int = 2) -> tuple[Job, ...]:
    """``"none;gaussian:0.3:relative@textdx:4+bypass"`` → jobs on ``task`` at ``p``.

    Each item is a gradient-defence spec, optionally followed by ``@`` and a hidden-state defence spec
    (none by default); ``;`` separates the items. Both are checked here (ValueError, one line).
    """
    from ..client.config import check_defense
    from ..privacy import parse_grad_defense

    jobs = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        grad, _, spec = (x.strip() for x in item.partition("@"))
        grad, spec = grad or "none", spec or "none"
        try:
            parse_grad_defense(grad)
        except ValueError as exc:
            raise ValueError(
                f"{grad!r} is not a gradient-defence spec: {str(exc).splitlines()[0]} (grammar: docs/privacy.md)"
            ) from None
        check_defense(spec)
        jobs.append((task, p, "none" if _is_none(grad) else grad, "none" if _is_none(spec) else spec))
    if not jobs:
        raise ValueError("--grad-configs named no configuration")
    return tuple(jobs)


def grid_for(cfg: PrivacyBenchConfig) -> LabelGrid:
    """The sweep ``cfg`` asks for: quick or full, or the gradient defences named with ``--grad-configs``."""
    grid = QUICK_GRID if cfg.quick else FULL_GRID
    if cfg.grad_configs:
        grid = replace(grid, jobs=parse_grad_configs(cfg.grad_configs, cfg.task))
    elif cfg.task != "sentiment":
        grid = replace(grid, jobs=tuple((cfg.task, *job[1:]) for job in grid.jobs))
    if cfg.steps:
        grid = replace(grid, budget=replace(grid.budget, steps=cfg.steps))
    return grid


# ------------------------------------------------------------------ capture and ground truth


class GradientCapture(ft.Capture):
    """The sweep's gRPC server, recording every gradient a client sends back, as the server decoded it.

    The servicer's ``grad_observers`` see each gradient as decoded, the tensor the body's backward uses.
    """

    def __init__(self, cfg: PrivacyBenchConfig) -> None:
        super().__init__(cfg)
        self.servicer.observers.remove(self._observe)  # the hidden states are not needed here
        self.grads: list[torch.Tensor] = []
        self.servicer.grad_observers.append(self._observe_grad)

    def _observe_grad(self, session, grad: torch.Tensor) -> None:
        self.grads.append(grad.detach().float().cpu())


def answer_class(tokenizer, labels_row: torch.Tensor, label_words: list[str]) -> int:
    """The class of one training row: the label word its answer tokens (labels ≠ -100) spell."""
    text = tokenizer.decode(labels_row[labels_row != -100].tolist(), skip_special_tokens=True)
    found = [c for c, word in enumerate(label_words) if re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text)]
    if len(found) != 1:
        raise RuntimeError(f"cannot tell the label of the answer {text!r} (label words {label_words})")
    return found[0]


class TrainingRecorder:
    """On the client (the bench's ground truth, not the attacker's): each training row's class, and
    how close each gradient it sends is to its clean gradient (cosine, the gradient defence's fidelity)."""

    def __init__(self, grad_spec: str, tokenizer, label_words: list[str]) -> None:
        from ..privacy import parse_grad_defense

        self.grad_defense = parse_grad_defense(grad_spec)
        self.tokenizer, self.label_words = tokenizer, label_words
        self.classes: list[list[int]] = []  # per step, per row
        self.cosines: list[float] = []

    def attach(self, client) -> None:
        train_step = client.train_step

        def recorded(batch, *args, **kwargs):
            self.classes.append(
                [answer_class(self.tokenizer, row, self.label_words) for row in batch["labels"]]
            )
            return train_step(batch, *args, **kwargs)

        client.train_step = recorded
        if self.grad_defense is not None:
            defense = self.grad_defense

            def measured(grad: torch.Tensor) -> torch.Tensor:
                sent = defense(grad)
                self.cosines.append(
                    float(F.cosine_similarity(grad.flatten().float(), sent.flatten().float(), 0))
                )
                return sent

            client.grad_defense = measured

    @property
    def cosine(self) -> float:
        return sum(self.cosines) / len(self.cosines) if self.cosines else 1.0


# ------------------------------------------------------------------ the attack


def label_features(grads: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per example ``[N, H]``, from per-step gradients ``[B, T, H]``: two views of the answer position.

    ``argmax``: each row's largest-norm position (:func:`~fedsplit.attacks.label.gradient_features`);
    ``column``: the column with the largest mean norm over the batch's rows (left padding puts every
    row's answer in the same columns), robust to noise on one row.
    """
    argmax = torch.cat([gradient_features(g) for g in grads])
    column = torch.cat([g[:, g.norm(dim=-1).mean(0).argmax()] for g in grads])
    return {"argmax": argmax, "column": column}


def known_split(labels: torch.Tensor, num_classes: int, per_class: int, seed: int):
    """``(known, scored)`` indices: ``per_class`` examples of each class at random, and the rest."""
    generator = torch.Generator().manual_seed(seed)
    known = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        known += members[torch.randperm(len(members), generator=generator)][:per_class].tolist()
    scored = torch.ones(len(labels), dtype=torch.bool)
    scored[known] = False
    return torch.tensor(sorted(known), dtype=torch.long), scored.nonzero().flatten()


def attack_labels(
    features: dict[str, torch.Tensor], labels: torch.Tensor, num_classes: int, per_class: int, seed: int
) -> dict:
    """Every label-inference method on every view; the strongest on the scored examples, and chance."""
    known, scored = known_split(labels, num_classes, per_class, seed)
    if len(scored) == 0 or len(known) == 0:
        raise ValueError(
            f"{len(labels)} captured examples leave none to score after {per_class} known per class"
        )
    methods = ("norm", "cluster", "classifier") if num_classes == 2 else ("cluster", "classifier")
    truth = labels[scored]
    results = {}
    for view, feats in features.items():
        for method in methods:
            pred, scores = infer_labels(
                feats[scored], num_classes, feats[known], labels[known], method=method, seed=seed
            )
            results[f"{method}/{view}"] = (accuracy(pred, truth), auc(scores, truth))
    best = max(results, key=lambda name: results[name][0])
    counts = torch.bincount(truth, minlength=num_classes)
    return {
        "label_accuracy": results[best][0],
        "auc": results[best][1],
        "attack": best,
        "all": {name: acc for name, (acc, _) in results.items()},
        "chance": float(counts.max()) / len(truth),
        "known": int(len(known)),
        "scored": int(len(scored)),
    }


# ------------------------------------------------------------------ one configuration


def _slug(spec: str) -> str:
    return spec.replace(":", "_").replace("+", "__").replace(",", "_").replace("=", "-")


def run_job(
    job: Job,
    cfg: PrivacyBenchConfig,
    grid: LabelGrid,
    capture: GradientCapture,
    out: Path,
    progress: bool,
) -> dict:
    """Fine-tune one configuration over gRPC, attack the gradients the server received: one row."""
    from ..model.loading import load_tokenizer
    from ..tasks import load_task

    task_name, p, grad_spec, spec = job
    budget = grid.budget
    started = time.perf_counter()
    task = load_task(task_name, seed=cfg.seed)
    if task.kind != "classification":
        raise ValueError(f"--labels needs a classification task; {task_name!r} is {task.kind}")
    recorder = TrainingRecorder(grad_spec, load_tokenizer(cfg.model), list(task.label_words))
    run_dir = out / "runs" / f"labels-{task_name}-p{p}-{_slug(grad_spec)}-{_slug(spec)}"
    capture.grads.clear()
    train, client, metric_name, metric = ft.fine_tune(
        (task_name, p, spec),
        cfg,
        budget,
        run_dir,
        progress,
        server=capture.server.address,
        configure=recorder.attach,
    )
    trained = time.perf_counter() - started
    if client.train_session is not None:
        client.train_session.close()
    client.transport.close()
    grads = list(capture.grads)
    shapes = [g.shape[0] for g in grads]
    if shapes != [len(rows) for rows in recorder.classes]:
        raise RuntimeError(f"captured gradients of {shapes} rows for training batches of {recorder.classes}")
    labels = torch.tensor([c for rows in recorder.classes for c in rows])
    num_classes = len(task.label_words)
    attack = attack_labels(label_features(grads), labels, num_classes, grid.known_labels, cfg.seed)
    row = {
        "key": job_key(*job),
        "task": task_name,
        "head_layers": p,
        "tail_layers": train.tail_layers,
        "grad_defense": grad_spec,
        "defense": spec,
        "metric": metric_name,
        "value": metric,
        "classes": num_classes,
        "gradients": len(labels),
        **attack,
        "grad_cosine": round(recorder.cosine, 4),
        "wire_dtype": train.wire_dtype,
        "steps": budget.steps,
        "train_seconds": round(trained, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "budget": {
            **{name: getattr(budget, name) for name in BUDGET_FIELDS},
            "known_labels": grid.known_labels,
        },
    }
    log.info(
        "%s: %s %.3f; label attack %.3f (%s), chance %.3f",
        row["key"],
        metric_name,
        metric,
        row["label_accuracy"],
        row["attack"],
        row["chance"],
    )
    return row


# ------------------------------------------------------------------ the sweep


def with_costs(rows: list[dict]) -> list[dict]:
    """Each row with ``cost_points``: 100 × (the undefended value − this value) at the same task and p."""
    clean = {
        (r["task"], r["head_layers"]): r["value"]
        for r in rows
        if r["grad_defense"] == "none" and r["defense"] == "none"
    }
    out = []
    for r in rows:
        base = clean.get((r["task"], r["head_layers"]))
        out.append(r | {"cost_points": None if base is None else round(100 * (base - r["value"]), 2)})
    return out


def target_rows(rows: list[dict], cost: float = 1.0, margin: float = 0.05) -> list[str]:
    """Keys of the configurations with a gradient defence within ``cost`` points whose label attack is
    within ``margin`` of chance."""
    return [
        r["key"]
        for r in with_costs(rows)
        if r["grad_defense"] != "none"
        and r["cost_points"] is not None
        and r["cost_points"] <= cost
        and r["label_accuracy"] <= r["chance"] + margin
    ]


def sweep(cfg: PrivacyBenchConfig, progress: bool = True, grid: LabelGrid | None = None) -> dict:
    """Run (or resume) the label sweep; returns the summary written to ``labels.json``.

    ``grid`` replaces the one ``cfg`` names (:func:`grid_for`), e.g. a tiny budget in tests.
    """
    from tqdm.auto import tqdm

    if not cfg.after_finetune:
        raise ValueError("--labels goes with --after-finetune")
    grid = grid or grid_for(cfg)
    out = Path(cfg.out or "results/privacy-ft")
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "labels.jsonl"
    done = {r["key"] for r in ft.read_rows(rows_path)}
    todo = [job for job in grid.jobs if job_key(*job) not in done]
    log.info("%d configuration(s) done, %d to run; rows in %s", len(done), len(todo), rows_path)
    started = time.perf_counter()
    capture = GradientCapture(cfg) if todo else None
    try:
        for job in tqdm(todo, desc="labels after fine-tuning", unit="config", disable=not progress):
            row = run_job(job, cfg, grid, capture, out, progress)
            with rows_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            write_reports(ft.read_rows(rows_path), out)
    finally:
        if capture is not None:
            capture.close()
    rows = with_costs(ft.read_rows(rows_path))
    write_reports(rows, out)
    return {
        "rows": rows,
        "seconds": time.perf_counter() - started,
        "quick": cfg.quick,
        "model": cfg.model,
        "target": target_rows(rows),
    }


def write_reports(rows: list[dict], out: Path) -> None:
    rows = with_costs(rows)
    (out / "labels.json").write_text(json.dumps({"rows": rows, "target": target_rows(rows)}, indent=2))
    (out / "labels.md").write_text(markdown(rows))


def markdown(rows: list[dict]) -> str:
    lines = [
        "| task | p | gradient defence | hidden-state defence | metric | cost (points) "
        "| label attack accuracy (attack) | AUC | chance | scored | gradient cosine | minutes |",
        "| --- | ---: | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in with_costs(rows):
        cost = "—" if r.get("cost_points") is None else f"{r['cost_points']:+.1f}"
        auc_text = "—" if r["auc"] is None or math.isnan(r["auc"]) else f"{r['auc']:.3f}"
        lines.append(
            f"| {r['task']} | {r['head_layers']} | `{r['grad_defense']}` | `{r['defense']}` "
            f"| {r['metric']} {r['value']:.3f} | {cost} | {r['label_accuracy']:.3f} ({r['attack']}) "
            f"| {auc_text} | {r['chance']:.3f} | {r['scored']} | {r['grad_cosine']:.3f} "
            f"| {r['seconds'] / 60:.1f} |"
        )
    return "\n".join(lines) + "\n"
