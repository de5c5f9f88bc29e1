"""End-to-end attack evaluation: victim data -> what the server observes -> attack -> scores.

:func:`evaluate_attack` plays both sides in one process. The *client* side tokenizes
``n`` victim prompts from a task's test split, runs the head and applies the defence,
exactly as :class:`~fedsplit.client.core.SplitClient` would before sending. The
*attacker* side gets only those hidden states (or, for ``label``, the gradients the
client sends back), the public weights, and public auxiliary text (the task's train
split, which never overlaps the victims). The victims' tokens are used only to score.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from .inversion import (
    DEFAULT_RELAX_STEPS,
    DEFAULT_VMI_STEPS,
    invert_nearest,
    invert_relaxation,
    invert_vmi,
    real_mask,
)
from .learned import DEFAULT_INVERTER_STEPS, Inverter, refine, train_inverter
from .metrics import mean_text_scores, token_prf
from .result import AttackResult

log = logging.getLogger(__name__)

ATTACKS = ("vmi", "relaxation", "learned", "nearest", "label")
# Also accepted: the learned inverter's output refined by white-box optimisation (BiSR-style).
EXTRA_ATTACKS = ("bisr",)
INVERSION_ATTACKS = ("vmi", "relaxation", "learned", "nearest", "bisr")

DEFAULT_MAX_TOKENS = 32
DEFAULT_AUX_EXAMPLES = 1024
QUICK = {"n": 32, "vmi": 40, "relaxation": 40, "learned": 100, "bisr": 20, "aux": 256}


def encode_texts(
    tokenizer, texts: list[str], max_tokens: int = DEFAULT_MAX_TOKENS, chat: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenize texts as the client would send them, left-padded.

    Each text is cut to its first ``max_tokens`` tokens. With ``chat`` the tokens follow
    the chat-template prefix (system prompt, role marker) the client puts in front.

    Returns:
        ``(input_ids [B, T], pad_lengths [B], score_mask [B, T])``: ``score_mask`` is True on
        the text's own tokens (not pad, not template, not special tokens): what is scored.
    """
    prefix: list[int] = []
    if chat:
        from ..tasks.prompts import format_prompt

        sentinel = "\u2063SPLIT\u2063"
        before = format_prompt(tokenizer, sentinel).split(sentinel)[0]
        prefix = list(tokenizer(before, add_special_tokens=False)["input_ids"])
    rows = [list(tokenizer(t, add_special_tokens=False)["input_ids"])[:max_tokens] for t in texts]
    width = len(prefix) + max(len(r) for r in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    score = torch.zeros((len(rows), width), dtype=torch.bool)
    pad = torch.empty(len(rows), dtype=torch.long)
    special = set(tokenizer.all_special_ids)
    for i, row in enumerate(rows):
        full = prefix + row
        pad[i] = width - len(full)
        ids[i, pad[i] :] = torch.tensor(full, dtype=torch.long)
        score[i, width - len(row) :] = torch.tensor([t not in special for t in row], dtype=torch.bool)
    return ids, pad, score


def token_batches(
    ids: torch.Tensor, pad: torch.Tensor, batch_size: int = 32
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cut a left-padded set of rows into batches, each trimmed of columns that are pad in all its rows."""
    order = torch.argsort(pad, descending=True, stable=True)
    out = []
    for s in range(0, len(order), batch_size):
        rows = order[s : s + batch_size]
        cut = int(pad[rows].min())
        out.append((ids[rows, cut:], pad[rows] - cut))
    return out


def run_inversion(
    attack: str,
    head: nn.Module,
    hidden: torch.Tensor,
    pad_lengths: torch.Tensor,
    *,
    steps: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    inverter: Inverter | None = None,
    vocab_size: int | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Recover token ids ``[B, T]`` from observed hidden states with one attack.

    Args:
        attack: ``"vmi"``, ``"relaxation"``, ``"nearest"``, ``"learned"`` or ``"bisr"``
            (learned, then refined by ``vmi``).
        head: the attacker's copy of the public head.
        hidden: what the server observed ``[B, T, H]``.
        pad_lengths: left-pad lengths ``[B]`` (the server receives them with the hidden states).
        steps: optimisation steps (vmi / relaxation / bisr refinement); defaults per attack.
        lr: learning rate override for the optimisation attacks.
        seed: seeds random starts.
        inverter: a trained :class:`Inverter` (``learned``, ``bisr``); see :func:`train_inverter`.
        vocab_size: the tokenizer's length (rows past it are never searched).
    """
    extra = {} if lr is None else {"lr": lr}
    if attack == "nearest":
        return invert_nearest(head, hidden, pad_lengths, vocab_size=vocab_size)
    if attack == "vmi":
        return invert_vmi(
            head,
            hidden,
            pad_lengths,
            steps=steps or DEFAULT_VMI_STEPS,
            seed=seed,
            vocab_size=vocab_size,
            progress=progress,
            **extra,
        )
    if attack == "relaxation":
        return invert_relaxation(
            head,
            hidden,
            pad_lengths,
            steps=steps or DEFAULT_RELAX_STEPS,
            seed=seed,
            vocab_size=vocab_size,
            progress=progress,
            **extra,
        )
    if attack in ("learned", "bisr"):
        if inverter is None:
            raise ValueError(f"the {attack} attack needs a trained inverter (see train_inverter)")
        guess = inverter.decode(hidden, pad_lengths)
        if attack == "learned":
            return guess
        return refine(
            head,
            hidden,
            pad_lengths,
            guess,
            steps=steps or DEFAULT_VMI_STEPS // 2,
            vocab_size=vocab_size,
            seed=seed,
            progress=progress,
            **({"lr": 0.5} | extra),
        )
    raise ValueError(f"unknown inversion attack {attack!r}; choose one of {INVERSION_ATTACKS}")


def _texts(examples) -> list[str]:
    return [ex.prompt for ex in examples]


def _defense_name(defense) -> str:
    return defense.name if defense is not None else "none"


def evaluate_attack(
    attack: str,
    *,
    spec: str = "smollm2-135m",
    head_layers: int = 2,
    defense_spec: str | None = None,
    task: str = "sentiment",
    n: int = 200,
    seed: int = 0,
    steps: int | None = None,
    quick: bool = False,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    chat: bool = False,
    aux_examples: int | None = None,
    tail_layers: int = 2,
    grad_defense_spec: str | None = None,
    label_method: str = "auto",
    known_labels: int = 8,
    label_binary: bool = False,
    progress: bool = True,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
) -> AttackResult:
    """Run one attack end to end against ``n`` victim examples and score it.

    Args:
        attack: one of :data:`ATTACKS` (or ``"bisr"``).
        spec: model spec (public weights both sides hold).
        head_layers: p, decoder blocks in the client's head.
        defense_spec: the client's defence on hidden states (``"gaussian:0.5"``, ...; None = none).
            The learned attacker trains with a fresh instance of the same defence.
        task: where the victim texts (test split) and auxiliary texts (train split) come from.
        n: victim examples.
        seed: seeds data sampling, defence noise and the attacks.
        steps: optimisation / inverter-training steps (defaults per attack).
        quick: smaller n (at most 32), fewer steps and less auxiliary text: a smoke run.
        max_tokens: victim and auxiliary texts are cut to this many tokens.
        chat: put the chat-template prefix in front, as the client does (only the text is scored).
        aux_examples: auxiliary texts for the learned attacker (default 1024, 256 when quick).
        tail_layers: q (matters for ``label`` only: the gradient is taken at the tail's input).
        grad_defense_spec: the client's defence on the gradient it sends (``label`` only).
        label_method: see :func:`~fedsplit.attacks.label.infer_labels`.
        known_labels: per class, examples with known labels the label attacker uses.
        label_binary: keep only the first and last label (e.g. negative vs positive) for ``label``.
        device, dtype: where the public model (the victim's head and the attacker's copy) computes,
            in which dtype ("auto": CUDA + bf16 where torch sees a GPU, else CPU + fp32).
    """
    if attack not in ATTACKS + EXTRA_ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACKS + EXTRA_ATTACKS)}")
    from ..model.loading import load_tokenizer
    from ..model.split import load_part
    from ..privacy import parse_defense
    from ..tasks import load_task

    if quick:
        n = min(n, QUICK["n"])
    start = time.perf_counter()
    if attack == "label":
        from .label import evaluate_label_attack

        return evaluate_label_attack(
            spec=spec,
            head_layers=head_layers,
            tail_layers=tail_layers,
            defense_spec=defense_spec,
            grad_defense_spec=grad_defense_spec,
            task=task,
            n=n,
            seed=seed,
            method=label_method,
            known_labels=known_labels,
            binary=label_binary,
            progress=progress,
            device=device,
            dtype=dtype,
        )

    tokenizer = load_tokenizer(spec)
    head = load_part(spec, "head", head_layers=head_layers, tail_layers=0, dtype=dtype, device=device)
    device = head.embed_tokens.weight.device
    hidden_size = head.embed_tokens.weight.shape[1]
    data = load_task(task, max_examples=max(4 * n, aux_examples or DEFAULT_AUX_EXAMPLES), seed=seed)
    victims = data.test[:n]
    if len(victims) < n:
        log.warning("task %s has only %d test examples; attacking those", task, len(victims))
    ids, pad, score = encode_texts(tokenizer, _texts(victims), max_tokens, chat)

    torch.manual_seed(seed)
    defense = parse_defense(defense_spec, hidden_size=hidden_size)
    if defense is not None:
        defense.to(device)  # a trainable defence (MID) computes beside the head
    with torch.no_grad():
        hidden = head(ids.to(device), pad.to(device))
        sent = defense(hidden, pad.to(device)) if defense is not None else hidden
    log.info(
        "%s vs %s: %d victims, p=%d, %s", attack, _defense_name(defense), len(victims), head_layers, spec
    )

    inverter = None
    if attack in ("learned", "bisr"):
        n_aux = aux_examples or (QUICK["aux"] if quick else DEFAULT_AUX_EXAMPLES)
        aux_ids, aux_pad, _ = encode_texts(tokenizer, _texts(data.train[:n_aux]), max_tokens, chat)
        torch.manual_seed(seed + 1)  # the attacker's copy of the mechanism, not the client's instance
        attacker_defense = parse_defense(defense_spec, hidden_size=hidden_size)
        if attacker_defense is not None:
            attacker_defense.to(device)
        train_steps = QUICK["learned"] if quick else DEFAULT_INVERTER_STEPS
        if attack == "learned" and steps is not None:
            train_steps = steps
        inverter = train_inverter(
            head,
            token_batches(aux_ids.to(device), aux_pad.to(device)),
            attacker_defense,
            steps=train_steps,
            seed=seed,
            ignore_ids=tokenizer.all_special_ids,
            progress=progress,
        )
    attack_steps = steps if attack != "learned" else None
    if quick and attack_steps is None and attack in QUICK:
        attack_steps = QUICK[attack]
    recovered = run_inversion(
        attack,
        head,
        sent,
        pad.to(device),
        steps=attack_steps,
        seed=seed,
        inverter=inverter,
        vocab_size=len(tokenizer),
        progress=progress,
    )
    return _score(attack, defense, head_layers, recovered.cpu(), ids, score, tokenizer, start, spec, task)


def _score(attack, defense, head_layers, recovered, ids, score, tokenizer, start, spec, task) -> AttackResult:
    special = tokenizer.all_special_ids
    true_rows = [ids[i][score[i]].tolist() for i in range(len(ids))]
    pred_rows = [recovered[i][score[i]].tolist() for i in range(len(ids))]
    precision, recall, f1 = token_prf(pred_rows, true_rows, ignore=special)
    true_texts = [tokenizer.decode(r) for r in true_rows]
    pred_texts = [tokenizer.decode(r) for r in pred_rows]
    rouge, bleu = mean_text_scores(pred_texts, true_texts)
    result = AttackResult(
        attack=attack,
        defense=_defense_name(defense),
        head_layers=head_layers,
        n=len(ids),
        seconds=round(time.perf_counter() - start, 2),
        token_precision=precision,
        token_recall=recall,
        token_f1=f1,
        rougeL=rouge,
        bleu4=bleu,
        model=spec,
        task=task,
        samples=list(zip(true_texts[:3], pred_texts[:3])),
    )
    log.info(
        "%s vs %s: token F1 %.3f, ROUGE-L %.3f (%.1f s)", attack, result.defense, f1, rouge, result.seconds
    )
    return result


__all__ = [
    "ATTACKS",
    "EXTRA_ATTACKS",
    "INVERSION_ATTACKS",
    "AttackResult",
    "encode_texts",
    "evaluate_attack",
    "run_inversion",
    "token_batches",
    "real_mask",
]
