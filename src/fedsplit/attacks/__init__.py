"""What an honest-but-curious server can recover from what it observes, and how well.

The server sees the hidden states the client sends (after the client's defence) and,
during training, the gradient w.r.t. the body output the client sends back. It knows
the public base weights, not the client's private LoRA. The attacks:

* token inversion from hidden states: ``nearest`` (p = 0), ``vmi`` (white-box
  optimisation of input embeddings), ``relaxation`` (optimisation over a softmax of
  the vocabulary), ``learned`` (an inverter trained on public text through the public
  head and the same defence) and ``bisr`` (learned, then refined by ``vmi``);
* ``label`` inference from gradients (norm scoring, clustering, a classifier);
* ``probe``: a per-position linear (or MLP) probe, the cheapest learned baseline.

Each inversion attack runs at three tiers of attacker knowledge (``public``,
``known-plaintext``, ``oracle``): see :mod:`fedsplit.attacks.tiers`.

See ``docs/attacks.md``.
"""

from .inversion import invert_nearest, invert_relaxation, invert_vmi, nearest_tokens
from .known_plaintext import KnownPairs, finetune_on_pairs, fit_state_map, split_known
from .label import LABEL_METHODS, gradient_features, infer_labels, kmeans, match_clusters, victim_gradients
from .learned import Inverter, refine, train_inverter
from .metrics import accuracy, auc, bleu4, mean_text_scores, rouge_l, token_prf
from .probe import PROBE_KINDS, Probe, train_probe
from .result import AttackResult
from .runner import (
    ATTACKS,
    EXTRA_ATTACKS,
    INVERSION_ATTACKS,
    encode_texts,
    evaluate_attack,
    run_inversion,
    token_batches,
)
from .tiers import (
    TIER_ATTACKS,
    TIERS,
    AttackerKnowledge,
    AttackScore,
    TierConfig,
    TierResult,
    evaluate_tiers,
    run_tier,
    score_tier,
)

__all__ = [
    "ATTACKS",
    "EXTRA_ATTACKS",
    "INVERSION_ATTACKS",
    "LABEL_METHODS",
    "PROBE_KINDS",
    "TIERS",
    "TIER_ATTACKS",
    "AttackResult",
    "AttackScore",
    "AttackerKnowledge",
    "Inverter",
    "KnownPairs",
    "Probe",
    "TierConfig",
    "TierResult",
    "accuracy",
    "auc",
    "bleu4",
    "encode_texts",
    "evaluate_attack",
    "evaluate_tiers",
    "finetune_on_pairs",
    "fit_state_map",
    "gradient_features",
    "infer_labels",
    "invert_nearest",
    "invert_relaxation",
    "invert_vmi",
    "kmeans",
    "match_clusters",
    "mean_text_scores",
    "nearest_tokens",
    "refine",
    "rouge_l",
    "run_inversion",
    "run_tier",
    "score_tier",
    "split_known",
    "token_batches",
    "token_prf",
    "train_inverter",
    "train_probe",
    "victim_gradients",
]
