"""Defences applied to what leaves the client: noise, DP clipping, sparsification, MID, and learned ones.

Learned and text-level defences: NoPeek (a distance-correlation penalty), adversarial
training against a simulated inverter, d_chi-private token replacement (``textdx``,
a :class:`TokenDefense` applied to the ids before the head) and ``bypass``.

Hidden states go through a :class:`Defense` (an ``nn.Module``) before they are sent
to the server; gradients go through a :class:`GradDefense`. Build them from text
specs with :func:`parse_defense` / :func:`parse_grad_defense` or from a
:class:`DefenseConfig`. See ``docs/privacy.md``.
"""

from fedsplit.privacy.accounting import calibrate_noise_multiplier, gaussian_epsilon, per_release_epsilon
from fedsplit.privacy.adversarial import AdversarialDefense, grad_reverse
from fedsplit.privacy.base import Compose, Defense, GradDefense, TokenDefense, real_token_mask
from fedsplit.privacy.bypass import BypassDefense
from fedsplit.privacy.defaults import resolve_defense_spec, warn_undefended
from fedsplit.privacy.dp import DPDefense, clip_tokens
from fedsplit.privacy.mid import MIDDefense
from fedsplit.privacy.noise import DXDefense, GaussianDefense, GaussianGradDefense, LaplaceDefense
from fedsplit.privacy.nopeek import NoPeekDefense, distance_correlation_sq
from fedsplit.privacy.sparsify import SparsifyDefense
from fedsplit.privacy.spec import (
    DEFENSE_SPEC_HELP,
    GRAD_SPEC_HELP,
    DefenseConfig,
    parse_defense,
    parse_defense_items,
    parse_grad_defense,
)
from fedsplit.privacy.text import TextDX

__all__ = [
    "DEFENSE_SPEC_HELP",
    "GRAD_SPEC_HELP",
    "AdversarialDefense",
    "BypassDefense",
    "Compose",
    "DPDefense",
    "DXDefense",
    "Defense",
    "DefenseConfig",
    "GaussianDefense",
    "GaussianGradDefense",
    "GradDefense",
    "LaplaceDefense",
    "MIDDefense",
    "NoPeekDefense",
    "SparsifyDefense",
    "TextDX",
    "TokenDefense",
    "calibrate_noise_multiplier",
    "clip_tokens",
    "distance_correlation_sq",
    "gaussian_epsilon",
    "grad_reverse",
    "parse_defense",
    "parse_defense_items",
    "parse_grad_defense",
    "per_release_epsilon",
    "real_token_mask",
    "resolve_defense_spec",
    "warn_undefended",
]
