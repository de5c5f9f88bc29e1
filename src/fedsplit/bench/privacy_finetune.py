"""`fedsplit bench privacy --after-finetune`: each defence judged on the model it protects.

For every configuration (task, p, defence spec):

1. **Fine-tune** the split model on the task with the defence on, the same steps, seed,
   data and order as the undefended run (FL-LLaMA's protocol: head, body and tail LoRA all
   adapt to the defence; trained defences learn their own weights). The task metric is the
   fine-tuned model's, with the defence on, against the fine-tuned undefended model's.
2. **Capture** what the fine-tuned, defended client sends for victim texts of the task's
   test split, at the *server side* of a real gRPC session (an observer on the servicer:
   exactly the states a curious operator can record, after the wire dtype).
3. **Attack** those states at the three tiers of :mod:`fedsplit.attacks.tiers` (public,
   known-plaintext with K pairs, white-box oracle) and keep the strongest attack per tier.

Rows are appended to ``rows.jsonl`` in the output folder as they finish, and a finished row is
skipped when the command runs again (resume a long sweep by re-running it). ``privacy_ft.md``,
``privacy_ft.json`` and ``frontier.png`` (task metric against the token F1 of the strongest
attack, one curve per tier) are rewritten from all rows after each one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..attacks.known_plaintext import DEFAULT_KNOWN_PAIRS, split_known
from ..attacks.runner import encode_texts, token_batches
from ..attacks.tiers import TIERS, AttackerKnowledge, TierConfig, evaluate_tiers
from ..client.config import TrainConfig
from ..client.remote import RemoteTransport
from ..client.train import build_client, run_training
from ..model.loading import load_tokenizer, model_fingerprint
from ..model.split import load_part
from ..server.config import ServerConfig
from ..server.runner import build_servicer, start_background
from .config import PrivacyBenchConfig

log = logging.getLogger(__name__)

# The victims' texts are cut to this many tokens (the attacks' default).
VICTIM_TOKENS = 32


@dataclass(frozen=True)
class Budget:
    """How much work each configuration gets: the same for every defence of a sweep."""

    steps: int = 32
    batch_size: int = 8
    lr: float = 3e-4
    max_length: int = 96
    eval_examples: int = 200
    victims: int = 48  # scored texts; K more are the known pairs
    known: int = DEFAULT_KNOWN_PAIRS
    public_texts: int = 2048
    # The strongest measured against the undefended split at p = 2 (bisr 0.94, the tied probe 0.83 on
    # the base head; the seen-vocabulary probes and the inverter alone ~0.54, nearest ~0.01).
    attacks: tuple[str, ...] = ("probe-tied", "learned", "bisr")
    # The oracle tier's figure never drops below the known-plaintext tier's; it adds the probe
    # trained through the client's own head (and defence) and its adaptations.
    attacks_at: tuple[tuple[str, tuple[str, ...]], ...] = (("oracle", ("probe-tied",)),)
    tiers: TierConfig = field(default_factory=TierConfig)


@dataclass(frozen=True)
class Grid:
    """The configurations of one sweep, in the order they run (the most informative first)."""

    budget: Budget
    jobs: tuple[tuple[str, int, str], ...]  # (task, p, defence spec)


SENTIMENT_FIRST = (
    # p = 2: the baseline, a server-noised control, then each kind of defence trained in
    ("sentiment", 2, "none"),
    ("sentiment", 2, "gaussian:8:relative+bypass"),
    ("sentiment", 2, "adv:1,noise=1+bypass"),
    ("sentiment", 2, "nopeek:1"),
    ("sentiment", 2, "textdx:6"),
    ("sentiment", 2, "mid:32"),
    # p = 4
    ("sentiment", 4, "none"),
    ("sentiment", 4, "gaussian:8:relative+bypass"),
    ("sentiment", 4, "adv:1,noise=1+bypass"),
    # more of the existing defences, trained in
    ("sentiment", 2, "gaussian:1:relative"),
    ("sentiment", 2, "dp:clip=50,sigma=0.05"),
    ("sentiment", 2, "sparsify:0.1"),
)

FULL_GRID = Grid(Budget(), SENTIMENT_FIRST)
QUICK_GRID = Grid(
    Budget(
        steps=12,
        batch_size=4,
        eval_examples=60,
        victims=16,
        known=8,
        public_texts=128,
        attacks=("probe-tied", "nearest"),
        attacks_at=(),
        tiers=TierConfig(probe_steps=60, finetune_steps=20),
    ),
    (("sentiment", 2, "none"), ("sentiment", 2, "gaussian:4:relative+bypass")),
)
# Summarization: the generation task, for the configurations named with --configs.
SUMMARIZATION_BUDGET = Budget(steps=20, batch_size=4, max_length=256, eval_examples=24)


def job_key(task: str, p: int, defense: str) -> str:
    return f"{task}|p={p}|{defense}"


def parse_configs(text: str, task: str) -> tuple[tuple[str, int, str], ...]:
    """``"2:none;2:adv:1;4:textdx:20"`` → jobs on ``task`` (``;`` between configurations)."""
    jobs = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        head, sep, spec = item.partition(":")
        if not sep or not head.strip().isdigit():
            raise ValueError(f"configuration {item!r} must read P:SPEC, e.g. 2:adv:1 or 4:none")
        jobs.append((task, int(head), spec.strip() or "none"))
    if not jobs:
        raise ValueError("--configs named no configuration")
    return tuple(jobs)


def grid_for(cfg: PrivacyBenchConfig) -> Grid:
    """The sweep ``cfg`` asks for: quick or full, or the configurations named with ``--configs``."""
    grid = QUICK_GRID if cfg.quick else FULL_GRID
    if cfg.configs:
        budget = grid.budget
        if cfg.task == "summarization" and not cfg.quick:
            budget = SUMMARIZATION_BUDGET
        grid = Grid(budget, parse_configs(cfg.configs, cfg.task))
    if cfg.steps:
        grid = replace(grid, budget=replace(grid.budget, steps=cfg.steps))
    return grid


# ------------------------------------------------------------------ one configuration


def epsilon_of(defense) -> str:
    """ε of the mechanism, where it has one, as text (``""`` otherwise)."""
    if defense is None:
        return ""
    parts = []
    members = getattr(defense, "defenses", [defense])

    def value(attribute) -> float:  # a property on some mechanisms, a method on others
        return float(attribute() if callable(attribute) else attribute)

    for member in members:
        if hasattr(member, "epsilon_per_token"):
            parts.append(f"{value(member.epsilon_per_token):g}·d per token (metric DP)")
        elif hasattr(member, "metric_epsilon"):
            parts.append(f"{value(member.metric_epsilon):g}·d per vector (metric DP)")
        else:
            spent = member.privacy_spent(steps=1)
            if spent is not None:
                parts.append(f"({spent[0]:.3g}, {spent[1]:g})-DP per vector")
    return "; ".join(parts)


class Capture:
    """One server for the whole sweep (holding every layer) that records the states it receives."""

    def __init__(self, cfg: PrivacyBenchConfig) -> None:
        config = ServerConfig(
            model=cfg.model, host="127.0.0.1", port=0, shutdown_grace=0.2, device=cfg.device, dtype=cfg.dtype
        )
        self.servicer = build_servicer(config)
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.servicer.observers.append(self._observe)
        self.server = start_background(self.servicer)
        self.fingerprint = model_fingerprint(cfg.model)

    def _observe(self, session, hidden: torch.Tensor, pad: torch.Tensor, offset: int) -> None:
        self.records.append((hidden.detach().float().cpu(), pad.cpu()))

    def sent_states(self, client, ids: torch.Tensor, pad: torch.Tensor, wire_dtype: str, batch: int = 16):
        """What ``client`` sends for ``ids`` over gRPC, as the server decoded it: ``[B, T, H]`` float32."""
        if client.train_session is not None:  # keep the fine-tuned body adapter, drop the local body
            client.body_adapter = client.train_session.adapter_state()
            client.train_session = None
        client.transport = RemoteTransport(
            self.server.address, wire_dtype=wire_dtype, fingerprint=self.fingerprint
        )
        client._score_session = None
        self.records.clear()
        if client.defense is not None:
            client.defense.eval()
        for start in range(0, len(ids), batch):
            client.logits(ids[start : start + batch], pad[start : start + batch])
        if len(self.records) != math.ceil(len(ids) / batch):
            raise RuntimeError(f"captured {len(self.records)} messages for {len(ids)} rows")
        return torch.cat([h for h, _ in self.records]), torch.cat([p for _, p in self.records])

    def close(self) -> None:
        self.server.stop()


def _metric(task_name: str, after: dict) -> tuple[str, float]:
    for key in ("accuracy", "rougeL", "f1", "exact_match"):
        if key in after:
            return key, float(after[key])
    raise ValueError(f"no task metric in {sorted(after)} for {task_name}")


def fine_tune(
    job: tuple[str, int, str],
    cfg: PrivacyBenchConfig,
    budget: Budget,
    run_dir: Path,
    progress: bool,
    *,
    server: str | None = None,
    configure=None,
) -> tuple[TrainConfig, object, str, float]:
    """Fine-tune one configuration with its defence on: ``(train config, client, metric name, value)``.

    The same steps, seed, data and order for every configuration of a ``budget``. The body is in
    this process, or behind the gRPC server at ``server`` (``HOST:PORT``); ``configure(client)``,
    if given, adjusts the client before it trains (e.g. sets a gradient defence).
    """
    task_name, p, spec = job
    train = TrainConfig(
        model=cfg.model,
        head_layers=p,
        tail_layers=2,
        task=task_name,
        steps=budget.steps,
        batch_size=budget.batch_size,
        lr=budget.lr,
        max_length=budget.max_length,
        defense=spec,
        seed=cfg.seed,
        eval_examples=budget.eval_examples,
        out=str(run_dir),
        device=cfg.device,
        dtype=cfg.dtype,
        server=server,
    )
    client = build_client(train)
    if configure is not None:
        configure(client)
    summary = run_training(train, client, progress=progress)
    metric_name, metric = _metric(task_name, summary["after"])
    return train, client, metric_name, metric


def run_job(
    job: tuple[str, int, str],
    cfg: PrivacyBenchConfig,
    budget: Budget,
    capture: Capture,
    public_text: list[str],
    out: Path,
    progress: bool,
) -> dict:
    """Fine-tune one configuration, capture what it sends over gRPC, attack it at every tier: one row."""
    from ..tasks import load_task

    task_name, p, spec = job
    started = time.perf_counter()
    run_dir = out / "runs" / f"{task_name}-p{p}-{spec.replace(':', '_').replace('+', '__').replace(',', '_')}"
    train, client, metric_name, metric = fine_tune(job, cfg, budget, run_dir, progress)
    trained = time.perf_counter() - started

    tokenizer = load_tokenizer(cfg.model)
    task = load_task(task_name, seed=cfg.seed)
    texts = [ex.prompt for ex in task.test[: budget.victims + budget.known]]
    ids, pad, score = encode_texts(tokenizer, texts, VICTIM_TOKENS)
    sent, sent_pad = capture.sent_states(client, ids, pad, train.wire_dtype)
    if not torch.equal(sent_pad, pad):
        raise RuntimeError("the captured pad lengths differ from the victims'")
    known, evaluated = split_known(ids, pad, sent, k=budget.known, seed=cfg.seed)
    public_head = load_part(
        cfg.model, "head", head_layers=p, tail_layers=0, device=cfg.device, dtype=cfg.dtype
    )
    device = public_head.embed_tokens.weight.device
    public_ids, public_pad, _ = encode_texts(tokenizer, public_text, VICTIM_TOKENS)
    knowledge = AttackerKnowledge(
        public_head=public_head,
        public_batches=token_batches(public_ids.to(device), public_pad.to(device)),
        defense_spec=spec,
        known_pairs=known.to(device),
        client_head=client.head,
        client_defense=client.defense,
        vocab_size=len(tokenizer),
        ignore_ids=tuple(tokenizer.all_special_ids),
    )
    results = evaluate_tiers(
        knowledge,
        sent[evaluated].to(device),
        pad[evaluated].to(device),
        ids[evaluated],
        score[evaluated],
        attacks=budget.attacks,
        attacks_at=dict(budget.attacks_at),
        config=budget.tiers,
        progress=False,
    )
    row = {
        "key": job_key(*job),
        "task": task_name,
        "head_layers": p,
        "defense": spec,
        "metric": metric_name,
        "value": metric,
        "epsilon": epsilon_of(client.defense),
        "victims": int(len(evaluated)),
        "known_pairs": len(known),
        "steps": budget.steps,
        "train_seconds": round(trained, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "tiers": {
            r.tier: {
                "token_f1": r.strongest.token_f1,
                "attack": r.strongest.attack,
                "attack_tier": r.strongest.tier,
                "all": {name: s.token_f1 for name, s in r.scores.items()},
            }
            for r in results
        },
    }
    log.info(
        "%s: %s %.3f; strongest F1 %s",
        row["key"],
        metric_name,
        metric,
        {t: round(v["token_f1"], 3) for t, v in row["tiers"].items()},
    )
    return row


# ------------------------------------------------------------------ the sweep


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def with_costs(rows: list[dict]) -> list[dict]:
    """Each row with ``cost_points``: 100 × (undefended value − this value) at the same task and p."""
    clean = {(r["task"], r["head_layers"]): r["value"] for r in rows if r["defense"] == "none"}
    out = []
    for r in rows:
        base = clean.get((r["task"], r["head_layers"]))
        out.append(r | {"cost_points": None if base is None else round(100 * (base - r["value"]), 2)})
    return out


def sweep(cfg: PrivacyBenchConfig, progress: bool = True, grid: Grid | None = None) -> dict:
    """Run (or resume) the after-fine-tuning sweep; returns the summary written to ``privacy_ft.json``.

    ``grid`` replaces the one ``cfg`` names (:func:`grid_for`), e.g. a tiny budget in tests.
    """
    from tqdm.auto import tqdm

    from ..tasks import load_task

    grid = grid or grid_for(cfg)
    out = Path(cfg.out or "results/privacy-ft")
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    done = {r["key"] for r in read_rows(rows_path)}
    todo = [job for job in grid.jobs if job_key(*job) not in done]
    log.info("%d configuration(s) done, %d to run; rows in %s", len(done), len(todo), rows_path)
    public_text = [ex.prompt for ex in load_task("dialogue", seed=cfg.seed).train[: grid.budget.public_texts]]
    started = time.perf_counter()
    capture = Capture(cfg) if todo else None
    try:
        for job in tqdm(todo, desc="privacy after fine-tuning", unit="config", disable=not progress):
            budget = grid.budget
            if job[0] == "summarization" and budget.max_length < SUMMARIZATION_BUDGET.max_length:
                budget = replace(budget, max_length=SUMMARIZATION_BUDGET.max_length)
            row = run_job(job, cfg, budget, capture, public_text, out, progress)
            row["budget"] = asdict(budget)
            with rows_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            write_reports(read_rows(rows_path), out)
    finally:
        if capture is not None:
            capture.close()
    rows = with_costs(read_rows(rows_path))
    summary = {
        "rows": rows,
        "seconds": time.perf_counter() - started,
        "quick": cfg.quick,
        "model": cfg.model,
        "target": target_rows(rows),
    }
    write_reports(rows, out)
    return summary


def target_rows(rows: list[dict], cost: float = 1.0, f1: float = 0.20) -> list[str]:
    """Keys of the configurations within ``cost`` points whose public and known-plaintext F1 ≤ ``f1``."""
    return [
        r["key"]
        for r in with_costs(rows)
        if r["defense"] != "none"
        and r["cost_points"] is not None
        and r["cost_points"] <= cost
        and max(r["tiers"][t]["token_f1"] for t in ("public", "known-plaintext") if t in r["tiers"]) <= f1
    ]


def write_reports(rows: list[dict], out: Path) -> None:
    rows = with_costs(rows)
    (out / "privacy_ft.json").write_text(json.dumps({"rows": rows, "target": target_rows(rows)}, indent=2))
    (out / "privacy_ft.md").write_text(markdown(rows))
    if rows:
        plot(rows, out / "frontier.png")


def markdown(rows: list[dict]) -> str:
    lines = [
        "| task | p | defence | metric | cost (points) | public F1 (attack) | known-plaintext F1 (attack) "
        "| oracle F1 (attack) | ε | minutes |",
        "| --- | ---: | --- | ---: | ---: | --- | --- | --- | --- | ---: |",
    ]
    for r in rows:
        cells = []
        for tier in TIERS:
            t = r["tiers"].get(tier)
            cells.append("—" if t is None else f"{t['token_f1']:.3f} ({t['attack']})")
        cost = "—" if r.get("cost_points") is None else f"{r['cost_points']:+.1f}"
        lines.append(
            f"| {r['task']} | {r['head_layers']} | `{r['defense']}` | {r['metric']} {r['value']:.3f} | {cost} | "
            + " | ".join(cells)
            + f" | {r.get('epsilon') or '—'} | {r['seconds'] / 60:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Task metric against the strongest attack's token F1, one marker set and frontier per tier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .privacy import pareto

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        sub = [r for r in rows if r["task"] == task]
        for tier, marker in zip(TIERS, "o^s"):
            have = [r for r in sub if tier in r["tiers"]]
            leak = [r["tiers"][tier]["token_f1"] for r in have]
            util = [r["value"] for r in have]
            line = ax.scatter(leak, util, marker=marker, label=tier)
            front = sorted(pareto(list(zip(leak, util))), key=lambda i: leak[i])
            ax.plot(
                [leak[i] for i in front],
                [util[i] for i in front],
                "--",
                linewidth=1,
                color=line.get_facecolor()[0],
            )
            if tier == "public":
                for r, x, y in zip(have, leak, util):
                    ax.annotate(f"p{r['head_layers']} {r['defense']}", (x, y), fontsize=6)
        ax.axvline(0.20, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel("token F1 of the strongest attack at the tier (privacy leaked)")
        ax.set_ylabel(f"fine-tuned {sub[0]['metric']} with the defence on")
        ax.set_title(f"{task}: privacy-utility after fine-tuning (dashed: frontier per tier)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
