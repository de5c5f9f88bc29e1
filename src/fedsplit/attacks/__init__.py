"""What an honest-but-curious server can recover from what it observes, and how well.

The server sees the hidden states the client sends (after the client's defence) and,
during training, the gradient w.r.t. the body output the client sends back. It knows
the public base weights, not the client's private LoRA. The attacks:

* token inversion from hidden states: ``nearest`` (p = 0), ``vmi`` (white-box
  optimisation of input embeddings), ``relaxation`` (optimisation over a softmax of
  the vocabulary), ``learned`` (an inverter trained on public text through the public
  head and the same defence) and ``bisr`` (learned, then refined by ``vmi``);
* ``label`` inference from gradients (norm scoring, clustering, a classifier).

See ``docs/attacks.md``.
"""

from .inversion import invert_nearest, invert_relaxation, invert_vmi, nearest_tokens
from .label import LABEL_METHODS, gradient_features, infer_labels, kmeans, match_clusters, victim_gradients
from .learned import Inverter, refine, train_inverter
from .metrics import accuracy, auc, bleu4, mean_text_scores, rouge_l, token_prf
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

__all__ = [
    "ATTACKS",
    "EXTRA_ATTACKS",
    "INVERSION_ATTACKS",
    "LABEL_METHODS",
    "AttackResult",
    "Inverter",
    "accuracy",
    "auc",
    "bleu4",
    "encode_texts",
    "evaluate_attack",
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
    "token_batches",
    "token_prf",
    "train_inverter",
    "victim_gradients",
]
