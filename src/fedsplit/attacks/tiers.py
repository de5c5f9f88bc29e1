"""The attacker at three tiers of knowledge, and the strongest attack at each.

The server is honest-but-curious and sees the hidden states the client sends (after the
client's defence). What it knows decides what it can do:

1. ``public``: the base weights (its own copy of the public head), the defence's
   mechanism and settings (it builds its own instance, seeded differently), and public
   text that is *not* the victim's. Attackers are trained / run through the public head.
2. ``known-plaintext``: public + K pairs of (victim text, hidden states the victim sent).
   Adaptations, all reported (the scorer keeps the best): ``+finetune`` fine-tunes the
   public-tier probe / inverter on the pairs (small lr, early-stopped on a held-out quarter
   of them, its vocabulary grown by the pairs' tokens); ``+align`` fits a ridge map from
   the observed states to the public head's clean outputs on the same texts (the attacker
   knows the texts, so it can run the head on them, token by token) and runs the
   public-tier attacks on the mapped states; ``+align+finetune`` does both (a model trained
   on noisy states meets the map's denoised ones, and fine-tuning on the mapped pairs
   closes that gap).
3. ``oracle``: known-plaintext + the client's head weights (an upper bound): attackers are
   trained / run through the client's head, then adapted on the K pairs as above.

:func:`run_tier` returns what each attack recovered at one tier (only what is new at that
tier), :func:`score_tier` scores it with :func:`~fedsplit.attacks.metrics.token_prf` and
names the strongest attack at or below the tier; :func:`evaluate_tiers` does both for every
tier. The K known texts never overlap the scored ones:
:func:`~fedsplit.attacks.known_plaintext.split_known` keeps them apart and :func:`score_tier`
checks it. A defence never passes by weakening an attacker: the strongest attack is what
counts.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from ..privacy import parse_defense
from .inversion import embedding_matrix, real_mask
from .known_plaintext import KnownPairs, finetune_on_pairs, fit_state_map
from .learned import DEFAULT_INVERTER_STEPS, train_inverter
from .metrics import token_prf
from .probe import DEFAULT_PROBE_LR, DEFAULT_PROBE_STEPS, train_probe
from .runner import run_inversion

TIERS = ("public", "known-plaintext", "oracle")
PROBES = {"probe": "linear", "probe-mlp": "mlp", "probe-tied": "tied"}
TIER_ATTACKS = ("probe", "probe-mlp", "probe-tied", "learned", "bisr", "vmi", "relaxation", "nearest")
DEFAULT_TIER_ATTACKS = ("probe", "learned", "bisr", "vmi", "relaxation")
_LEARNED_LR = 2e-3  # train_inverter's default


@dataclass
class AttackerKnowledge:
    """What the attacker holds; :meth:`at` keeps only what a tier allows."""

    public_head: nn.Module = field(metadata={"help": "the attacker's copy of the public head (base weights)"})
    public_batches: list[tuple[torch.Tensor, torch.Tensor]] = field(
        metadata={"help": "(ids, pad) token batches of public text, not the victim's (token_batches)"}
    )
    defense_spec: str | None = field(
        default=None,
        metadata={"help": "the client's defence mechanism and settings (the attacker builds its own)"},
    )
    known_pairs: KnownPairs | None = field(
        default=None, metadata={"help": "K (victim ids, pad, sent states) pairs; known-plaintext and oracle"}
    )
    client_head: nn.Module | None = field(
        default=None, metadata={"help": "the client's own head weights; oracle tier only"}
    )
    client_defense: nn.Module | None = field(
        default=None,
        metadata={"help": "the client's trained defence (adv / mid weights); oracle tier only"},
    )
    vocab_size: int | None = field(default=None, metadata={"help": "the tokenizer's length"})
    ignore_ids: tuple[int, ...] = field(default=(), metadata={"help": "special token ids, never a class"})

    def at(self, tier: str) -> AttackerKnowledge:
        """This knowledge cut down to ``tier``; a one-line error when the tier needs what is missing."""
        if tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")
        if tier == "public":
            return replace(self, known_pairs=None, client_head=None, client_defense=None)
        if self.known_pairs is None or len(self.known_pairs) < 4:
            got = 0 if self.known_pairs is None else len(self.known_pairs)
            raise ValueError(f"the {tier} tier needs at least 4 known pairs (got {got}); see split_known")
        if tier == "oracle" and self.client_head is None:
            raise ValueError("the oracle tier needs the client's head (AttackerKnowledge.client_head)")
        return self if tier == "oracle" else replace(self, client_head=None, client_defense=None)


@dataclass
class TierConfig:
    """How hard the attacker works at each tier (training and optimisation budgets)."""

    probe_steps: int = field(default=DEFAULT_PROBE_STEPS, metadata={"help": "probe training steps"})
    inverter_steps: int = field(default=DEFAULT_INVERTER_STEPS, metadata={"help": "inverter training steps"})
    vmi_steps: int | None = field(default=None, metadata={"help": "vmi steps (None: the attack's default)"})
    relaxation_steps: int | None = field(default=None, metadata={"help": "relaxation steps (None: default)"})
    bisr_steps: int | None = field(default=None, metadata={"help": "bisr refinement steps (None: default)"})
    finetune_steps: int = field(default=100, metadata={"help": "most fine-tuning steps on the known pairs"})
    finetune_lr_scale: float = field(
        default=0.1, metadata={"help": "fine-tuning lr as a fraction of the model's training lr"}
    )
    holdout: float = field(default=0.25, metadata={"help": "fraction of the known pairs held out to stop on"})
    seed: int = field(default=0, metadata={"help": "the attacker's seed (never the client's)"})


@dataclass
class AttackScore:
    """Bag-of-tokens scores of one attack at one tier."""

    tier: str
    attack: str
    token_precision: float
    token_recall: float
    token_f1: float


@dataclass
class TierResult:
    """All attacks at one tier, and the strongest one at or below it."""

    tier: str
    strongest: AttackScore
    scores: dict[str, AttackScore]

    def as_dict(self) -> dict[str, object]:
        """Flat row: the tier, the strongest attack (and its tier) and its scores."""
        best = asdict(self.strongest)
        return {"tier": self.tier, "attack_tier": best.pop("tier")} | best


# ------------------------------------------------------------------ running and scoring the tiers


def _attacker_defense(knowledge: AttackerKnowledge, device: torch.device, seed: int, oracle: bool = False):
    """The attacker's own instance of the defence mechanism (its own seed, its own weights for mid / adv);
    at the oracle tier a copy of the client's trained defence when the attacker holds it."""
    if oracle and knowledge.client_defense is not None:
        return copy.deepcopy(knowledge.client_defense).to(device).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)  # as the runner does: never the draws of a client seeded with ``seed``
        table = embedding_matrix(knowledge.public_head)
        defense = parse_defense(
            knowledge.defense_spec,
            hidden_size=table.shape[1],
            embedding=table.detach(),
            keep_ids=knowledge.ignore_ids,
        )
    return defense.to(device).eval() if defense is not None else None


def _trained(name: str, head: nn.Module, knowledge, config: TierConfig, progress: bool) -> nn.Module:
    """A probe or an inverter trained on public text through ``head`` and the attacker's defence."""
    oracle = head is knowledge.client_head
    defense = _attacker_defense(knowledge, embedding_matrix(head).device, config.seed, oracle)
    common = dict(seed=config.seed, ignore_ids=knowledge.ignore_ids, progress=progress)
    if name in PROBES:
        return train_probe(
            head,
            knowledge.public_batches,
            defense,
            kind=PROBES[name],
            steps=config.probe_steps,
            vocab_size=knowledge.vocab_size,
            **common,
        )
    return train_inverter(head, knowledge.public_batches, defense, steps=config.inverter_steps, **common)


def _invert(attack, head, hidden, pad, model, knowledge, config: TierConfig, progress: bool):
    if attack in PROBES:
        return model.decode(hidden, pad)
    steps = {"vmi": config.vmi_steps, "relaxation": config.relaxation_steps, "bisr": config.bisr_steps}
    return run_inversion(
        attack,
        head,
        hidden,
        pad,
        steps=steps.get(attack),
        seed=config.seed,
        inverter=model,
        vocab_size=knowledge.vocab_size,
        progress=progress,
    )


def run_tier(
    tier: str,
    knowledge: AttackerKnowledge,
    observed_hidden: torch.Tensor,
    observed_pad: torch.Tensor,
    *,
    attacks: Sequence[str] = DEFAULT_TIER_ATTACKS,
    config: TierConfig | None = None,
    cache: dict | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """What each attack recovers at ``tier`` from the observed states: ``{name: ids [B, T]}``.

    Only what is new at the tier is run: ``public`` gives the plain attacks through the
    public head; ``known-plaintext`` gives ``A+align`` (every attack, on the mapped states)
    and, for the attacks with a trained model (probes, ``learned``, ``bisr``), ``A+finetune``
    (the model fine-tuned on the pairs' sent states) and ``A+align+finetune`` (fine-tuned on
    the pairs' mapped states, run on the mapped states); ``oracle`` gives the plain attacks
    through the client's head and the same adaptations. Pass one ``cache`` dict to calls on the
    same knowledge to train each probe / inverter once (the known-plaintext tier adapts the
    public tier's).
    """
    unknown = [a for a in attacks if a not in TIER_ATTACKS]
    if unknown:
        raise ValueError(f"unknown tier attack {unknown[0]!r}; choose from {', '.join(TIER_ATTACKS)}")
    config = config or TierConfig()
    knowledge = knowledge.at(tier)
    cache = {} if cache is None else cache
    head = knowledge.client_head if tier == "oracle" else knowledge.public_head
    role = "client" if tier == "oracle" else "public"
    table = embedding_matrix(head)

    def model_for(attack: str, tuned_on: tuple[str, KnownPairs] | None = None) -> nn.Module | None:
        """The trained probe / inverter for ``attack`` (None if it has none), fine-tuned on some pairs."""
        name = "learned" if attack == "bisr" else attack
        if name not in PROBES and name != "learned":
            return None
        if (role, name) not in cache:
            cache[role, name] = _trained(name, head, knowledge, config, progress)
        if tuned_on is None:
            return cache[role, name]
        tag, pairs = tuned_on
        if (role, name, tag) not in cache:
            base_lr = DEFAULT_PROBE_LR[PROBES[name]] if name in PROBES else _LEARNED_LR
            cache[role, name, tag] = finetune_on_pairs(
                cache[role, name],
                pairs,
                table,
                steps=config.finetune_steps,
                lr=base_lr * config.finetune_lr_scale,
                holdout=config.holdout,
                seed=config.seed,
                ignore_ids=knowledge.ignore_ids,
            )
        return cache[role, name, tag]

    def invert(attack, hidden, model):
        return _invert(attack, head, hidden, observed_pad, model, knowledge, config, progress)

    out: dict[str, torch.Tensor] = {}
    if tier != "known-plaintext":
        for attack in attacks:
            out[attack] = invert(attack, observed_hidden, model_for(attack))
    if tier == "public":
        return out
    known = knowledge.known_pairs
    state_map = fit_state_map(known, head, holdout=config.holdout, seed=config.seed)
    mapped = state_map(observed_hidden.to(table.device))
    mapped_known = KnownPairs(known.ids, known.pad, state_map(known.hidden.to(table.device)))
    for attack in attacks:
        trained = model_for(attack) is not None
        if trained:
            out[f"{attack}+finetune"] = invert(
                attack, observed_hidden, model_for(attack, ("finetune", known))
            )
        out[f"{attack}+align"] = invert(attack, mapped, model_for(attack))
        if trained:
            tuned = model_for(attack, ("align+finetune", mapped_known))
            out[f"{attack}+align+finetune"] = invert(attack, mapped, tuned)
    return out


def _rows(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m].tolist() for row, m in zip(ids.cpu(), mask.cpu())]


def score_tier(
    tier: str,
    recovered: dict[str, torch.Tensor],
    true_ids: torch.Tensor,
    score_mask: torch.Tensor,
    *,
    ignore: Iterable[int] = (),
    known: KnownPairs | None = None,
    below: Sequence[TierResult] = (),
) -> TierResult:
    """Score each attack's ids against the truth and name the strongest at or below ``tier``.

    Args:
        recovered: ``{attack: ids [B, T]}`` from :func:`run_tier`.
        true_ids: the evaluated victims' ids ``[B, T]``; ``score_mask`` ``[B, T]`` marks the
            scored tokens (:func:`~fedsplit.attacks.runner.encode_texts`).
        ignore: ids left out of the bags (special tokens).
        known: the known pairs; raises if one of their texts is among the scored ones.
        below: the lower tiers' results: an attacker who knows more can run their attacks too,
            so the strongest here is the best of theirs and this tier's (lower tier first on ties).
    """
    truth = _rows(true_ids, score_mask)
    if known is not None:
        known_texts = {tuple(t) for t in _rows(known.ids, real_mask(known.pad, known.ids.shape[1]))}
        if known_texts & {tuple(t) for t in truth}:
            raise ValueError("a known pair's text is among the scored victims; split them with split_known")
    scores = {}
    for name, ids in recovered.items():
        precision, recall, f1 = token_prf(_rows(ids, score_mask), truth, ignore=ignore)
        scores[name] = AttackScore(tier, name, precision, recall, f1)
    candidates = [result.strongest for result in below] + list(scores.values())
    if not candidates:
        raise ValueError("nothing to score: no attack was run")
    return TierResult(tier, max(candidates, key=lambda s: s.token_f1), scores)


def evaluate_tiers(
    knowledge: AttackerKnowledge,
    observed_hidden: torch.Tensor,
    observed_pad: torch.Tensor,
    true_ids: torch.Tensor,
    score_mask: torch.Tensor,
    *,
    tiers: Sequence[str] = TIERS,
    attacks: Sequence[str] = DEFAULT_TIER_ATTACKS,
    attacks_at: dict[str, Sequence[str]] | None = None,
    config: TierConfig | None = None,
    progress: bool = False,
) -> list[TierResult]:
    """Run and score ``tiers`` in order; each tier's strongest attack also counts the tiers below it.

    The observed rows must be the evaluated victims only (:func:`split_known` gives their
    indices); the victims' true ids are used only to score. ``attacks_at`` names other attacks
    for some tiers (e.g. a cheaper set at the oracle tier, whose figure is never below the
    known-plaintext tier's anyway).
    """
    cache: dict = {}
    results: list[TierResult] = []
    for tier in sorted(tiers, key=TIERS.index):
        recovered = run_tier(
            tier,
            knowledge,
            observed_hidden,
            observed_pad,
            attacks=(attacks_at or {}).get(tier, attacks),
            config=config,
            cache=cache,
            progress=progress,
        )
        results.append(
            score_tier(
                tier,
                recovered,
                true_ids,
                score_mask,
                ignore=knowledge.ignore_ids,
                known=knowledge.known_pairs,
                below=results,
            )
        )
    return results


__all__ = [
    "DEFAULT_TIER_ATTACKS",
    "TIERS",
    "TIER_ATTACKS",
    "AttackScore",
    "AttackerKnowledge",
    "TierConfig",
    "TierResult",
    "evaluate_tiers",
    "run_tier",
    "score_tier",
]
