"""What a curious server can read of *your* data from the states *your* client sends.

:func:`audit_client` runs a user's own texts through their :class:`~fedsplit.client.core.SplitClient`
the normal way (:meth:`~fedsplit.client.core.SplitClient.logits`: head, defence, transport, body,
tail), records with a tap exactly what leaves the client (optionally round-tripped through the
wire dtype, so the figure is about the bytes the server gets), and plays the server at two of
the tiers of :mod:`fedsplit.attacks.tiers`:

* ``public``: the base weights (its own copy of the public head), the defence's mechanism and
  settings, and public text that is not the user's;
* ``known-plaintext``: public + ``k`` of the user's texts with the states sent for them.

The remaining texts are attacked and scored (bag-of-tokens F1 of the strongest attack at or
below each tier). The headline is the strongest tier's F1 as a percentage: "a curious server
recovers about X % of your tokens". ``fedsplit audit`` is the command.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .known_plaintext import split_known
from .runner import DEFAULT_MAX_TOKENS, encode_texts, token_batches
from .tiers import TIER_ATTACKS, AttackerKnowledge, TierConfig, TierResult, run_tier, score_tier

log = logging.getLogger(__name__)

AUDIT_TIERS = ("public", "known-plaintext")
# The strongest measured against an undefended split at p = 2 (`fedsplit bench privacy --after-finetune`):
# bisr (the inverter's guess refined through the public head), and the tied probe, which reads tokens
# the public text never showed it.
DEFAULT_AUDIT_ATTACKS = ("probe-tied", "learned", "bisr")
DEFAULT_PUBLIC_EXAMPLES = 1024
MIN_KNOWN = 4  # the known-plaintext tier needs at least this many pairs
N_EXAMPLES = 3
LABEL_NOT_RUN = "not run (see fedsplit attack label)"
TEXT_FIELDS = ("prompt", "text")


@dataclass
class AuditReport:
    """What :func:`audit_client` found; :meth:`as_dict` is its JSON form."""

    model: str
    head_layers: int
    defense: str  # the defence spec the client sends through ("none": none)
    wire_dtype: str | None  # the wire dtype the sent states were round-tripped through (None: as computed)
    scored: int  # texts attacked and scored
    known_pairs: int  # texts given to the known-plaintext attacker with their states
    public_texts: int  # public texts the attacker trained on
    attacks: list[str]
    tiers: list[TierResult]
    examples: list[dict[str, str]] = field(default_factory=list)  # original vs the strongest attack's guess
    label_attack: str | None = None  # the label-attack figure (or why it was not run); None: not a classifier
    seconds: float = 0.0

    @property
    def strongest(self):
        """The strongest attack over all the tiers (an :class:`~fedsplit.attacks.tiers.AttackScore`)."""
        return max((t.strongest for t in self.tiers), key=lambda s: s.token_f1)

    @property
    def recovered_percent(self) -> int:
        """100 x the strongest tier's token F1, rounded: the headline figure."""
        return round(100 * self.strongest.token_f1)

    @property
    def headline(self) -> str:
        return f"a curious server recovers about {self.recovered_percent} % of your tokens"

    def tier(self, name: str) -> TierResult:
        """The result of tier ``name``."""
        for result in self.tiers:
            if result.tier == name:
                return result
        raise KeyError(f"tier {name!r} was not run; the audit ran {', '.join(t.tier for t in self.tiers)}")

    def as_dict(self) -> dict[str, object]:
        """Headline first, then the settings, a row per tier (with every attack's scores) and the examples."""
        tiers = []
        for result in self.tiers:
            scores = {
                name: {k: v for k, v in asdict(s).items() if k.startswith("token_")}
                for name, s in result.scores.items()
            }
            tiers.append(result.as_dict() | {"scores": scores})
        return {
            "headline": self.headline,
            "recovered_percent": self.recovered_percent,
            "strongest": asdict(self.strongest),
            "model": self.model,
            "head_layers": self.head_layers,
            "defense": self.defense,
            "wire_dtype": self.wire_dtype,
            "scored": self.scored,
            "known_pairs": self.known_pairs,
            "public_texts": self.public_texts,
            "attacks": list(self.attacks),
            "tiers": tiers,
            "examples": self.examples,
            "label_attack": self.label_attack,
            "seconds": self.seconds,
        }


# ------------------------------------------------------------------ reading the user's texts


def read_texts(path: str | Path, fields: Sequence[str] = TEXT_FIELDS) -> list[str]:
    """The texts of a JSONL file: each line a JSON object, its first of ``fields`` that is present.

    Blank lines are skipped. Raises ValueError naming the file and line of a line that is not a
    JSON object or has none of the fields, and for a file with no texts.
    """
    from ..tasks.base import TaskError
    from ..tasks.jsonl import read_jsonl

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        records = read_jsonl(path)
    except TaskError as err:
        raise ValueError(str(err)) from None
    texts = []
    for number, record in enumerate(records, 1):
        name = next((f for f in fields if f in record), None)
        if name is None or not isinstance(record[name], str):
            wanted = " or ".join(f'"{f}"' for f in fields)
            raise ValueError(f"{path}:{number}: no {wanted} text field (keys: {', '.join(record) or 'none'})")
        texts.append(record[name])
    if not texts:
        raise ValueError(f"{path}: no texts")
    return texts


def read_public_texts(path: str | Path) -> list[str]:
    """Public text from a file: a ``.jsonl`` file as :func:`read_texts` reads it, else one text per line."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return read_texts(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    texts = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError(f"{path}: no texts")
    return texts


def default_public_texts(n: int = DEFAULT_PUBLIC_EXAMPLES, seed: int = 0) -> list[str]:
    """``n`` prompts of the packaged ``dialogue`` task's train split: public text, no download."""
    from ..tasks import load_task

    return [ex.prompt for ex in load_task("dialogue", max_examples=n, seed=seed).train[:n]]


# ------------------------------------------------------------------ what the client sends


def wire_round_trip(t: torch.Tensor, wire_dtype: str) -> torch.Tensor:
    """``t`` as the server decodes it after it crossed the wire in ``wire_dtype`` (same dtype and device)."""
    from ..wire import codec

    msg = codec.encode_tensor(t, wire_dtype)
    return codec.decode_tensor(msg, out_dtype=t.dtype, device=t.device, max_elements=max(t.numel(), 1))


def capture_sent(
    client, ids: torch.Tensor, pad: torch.Tensor, *, batch_size: int = 16, wire_dtype: str | None = None
) -> torch.Tensor:
    """The states ``client`` sends for the left-padded rows ``ids`` ``[B, T]``: ``[B, T, H]``.

    Runs the rows the normal way (:meth:`~fedsplit.client.core.SplitClient.logits`, so they go
    through the transport to the body) with a tap on :meth:`~fedsplit.client.core.SplitClient.send`;
    with ``wire_dtype`` the tapped states are round-tripped through it (what the server decodes).
    """
    captured: list[torch.Tensor] = []

    def tap(sent: torch.Tensor, pad_lengths: torch.Tensor) -> None:
        captured.append(wire_round_trip(sent, wire_dtype) if wire_dtype else sent.clone())

    client.taps.append(tap)
    try:
        for start in range(0, len(ids), batch_size):
            client.logits(ids[start : start + batch_size], pad[start : start + batch_size])
    finally:
        client.taps.remove(tap)
    hidden = torch.cat(captured)
    if hidden.shape[:2] != ids.shape:
        raise RuntimeError(f"the tap saw states of shape {list(hidden.shape)} for ids {list(ids.shape)}")
    return hidden


# ------------------------------------------------------------------ the audit


def audit_client(
    client,
    tokenizer,
    texts: Sequence[str],
    *,
    spec: str,
    head_layers: int,
    public_texts: Sequence[str],
    defense_spec: str | None,
    n: int = 64,
    k: int = 32,
    attacks: Sequence[str] = DEFAULT_AUDIT_ATTACKS,
    tier_config: TierConfig | None = None,
    seed: int = 0,
    progress: bool = True,
    wire_dtype: str | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    label_attack: str | None = None,
) -> AuditReport:
    """What a curious server reads of ``texts`` from the states ``client`` sends for them.

    Args:
        client: the user's :class:`~fedsplit.client.core.SplitClient` (adapters and defence loaded).
        tokenizer: its tokenizer.
        texts: the user's own texts; the first ``n`` (non-blank) are used, each cut to ``max_tokens``.
        spec: the base model (the server holds its weights: the attacker's public head).
        head_layers: p, blocks in the client's head.
        public_texts: text the attacker trains on; any equal to one of ``texts`` is dropped.
        defense_spec: the client's defence spec (the attacker knows the mechanism); None: none.
        n: texts audited: ``k`` of them are the known-plaintext pairs, the rest are attacked and scored.
        k: known pairs (at least 4, fewer than the texts).
        attacks: tier attacks (:data:`~fedsplit.attacks.tiers.TIER_ATTACKS`).
        tier_config: the attacker's budgets (default :class:`~fedsplit.attacks.tiers.TierConfig`).
        seed: which texts are known, and the attacker's seed (unless ``tier_config`` sets it).
        wire_dtype: round-trip the sent states through this wire dtype (None: as computed).
        label_attack: the label-attack line to report (e.g. :data:`LABEL_NOT_RUN`); None: none.
    """
    from ..model.split import load_part

    started = time.perf_counter()
    unknown = [a for a in attacks if a not in TIER_ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack {unknown[0]!r}; choose from {', '.join(TIER_ATTACKS)}")
    if not attacks:
        raise ValueError("give at least one attack")
    texts = [t for t in texts if t.strip()][:n]
    if k < MIN_KNOWN:
        raise ValueError(f"k must be at least {MIN_KNOWN} (the known-plaintext tier needs that many pairs)")
    if len(texts) <= k:
        raise ValueError(f"{len(texts)} texts leave none to score after k={k} known pairs: give more than k")
    config = tier_config or TierConfig(seed=seed)

    ids, pad, score = encode_texts(tokenizer, texts, max_tokens)
    hidden = capture_sent(client, ids, pad, wire_dtype=wire_dtype)
    device = hidden.device
    known, evaluated = split_known(ids, pad, hidden, k, seed)
    if len(evaluated) == 0:
        raise ValueError("every text repeats a known one: nothing left to score; give distinct texts")

    own = set(texts)
    public = [t for t in public_texts if t.strip() and t not in own]
    if not public:
        raise ValueError("no public text that differs from yours: the attacker needs some")
    pub_ids, pub_pad, _ = encode_texts(tokenizer, public, max_tokens)
    table = client.head.embed_tokens.weight
    public_head = load_part(
        spec, "head", head_layers=head_layers, tail_layers=0, device=device, dtype=table.dtype
    )
    knowledge = AttackerKnowledge(
        public_head=public_head,
        public_batches=token_batches(pub_ids.to(device), pub_pad.to(device)),
        defense_spec=defense_spec,
        known_pairs=known,
        vocab_size=len(tokenizer),
        ignore_ids=tuple(tokenizer.all_special_ids),
    )
    observed, observed_pad = hidden[evaluated], pad[evaluated].to(device)
    true_ids, mask = ids[evaluated], score[evaluated]
    log.info(
        "audit: %d texts scored, %d known, %d public texts; attacks %s",
        len(evaluated),
        len(known),
        len(public),
        ", ".join(attacks),
    )

    cache: dict = {}
    results: list[TierResult] = []
    recovered: dict[str, dict[str, torch.Tensor]] = {}
    for tier in AUDIT_TIERS:
        recovered[tier] = run_tier(
            tier,
            knowledge,
            observed,
            observed_pad,
            attacks=attacks,
            config=config,
            cache=cache,
            progress=progress,
        )
        result = score_tier(
            tier, recovered[tier], true_ids, mask, ignore=knowledge.ignore_ids, known=known, below=results
        )
        results.append(result)
        log.info("audit %s tier: %s, token F1 %.3f", tier, result.strongest.attack, result.strongest.token_f1)

    best = max((r.strongest for r in results), key=lambda s: s.token_f1)
    guess = recovered[best.tier][best.attack].cpu()
    examples = [
        {
            "original": tokenizer.decode(true_ids[i][mask[i]], skip_special_tokens=True),
            "recovered": tokenizer.decode(guess[i][mask[i]], skip_special_tokens=True),
        }
        for i in range(min(N_EXAMPLES, len(true_ids)))
    ]
    return AuditReport(
        model=spec,
        head_layers=head_layers,
        defense=defense_spec or "none",
        wire_dtype=wire_dtype,
        scored=len(evaluated),
        known_pairs=len(known),
        public_texts=len(public),
        attacks=list(attacks),
        tiers=results,
        examples=examples,
        label_attack=label_attack,
        seconds=round(time.perf_counter() - started, 2),
    )


__all__ = [
    "AUDIT_TIERS",
    "DEFAULT_AUDIT_ATTACKS",
    "LABEL_NOT_RUN",
    "AuditReport",
    "audit_client",
    "capture_sent",
    "default_public_texts",
    "read_public_texts",
    "read_texts",
    "wire_round_trip",
]
