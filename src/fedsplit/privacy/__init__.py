"""Defences applied to what leaves the client: noise, clipping with DP accounting, sparsification, MID.

Hidden states go through a :class:`Defense` (an ``nn.Module``) before they are sent
to the server; gradients go through a :class:`GradDefense`. Build them from text
specs with :func:`parse_defense` / :func:`parse_grad_defense` or from a
:class:`DefenseConfig`. See ``docs/privacy.md``.
"""

from fedsplit.privacy.accounting import calibrate_noise_multiplier, gaussian_epsilon, per_release_epsilon
from fedsplit.privacy.base import Compose, Defense, GradDefense
from fedsplit.privacy.dp import DPDefense, clip_tokens
from fedsplit.privacy.mid import MIDDefense
from fedsplit.privacy.noise import DXDefense, GaussianDefense, GaussianGradDefense, LaplaceDefense
from fedsplit.privacy.sparsify import SparsifyDefense
from fedsplit.privacy.spec import (
    DEFENSE_SPEC_HELP,
    GRAD_SPEC_HELP,
    DefenseConfig,
    parse_defense,
    parse_defense_items,
    parse_grad_defense,
)

__all__ = [
    "DEFENSE_SPEC_HELP",
    "GRAD_SPEC_HELP",
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
    "SparsifyDefense",
    "calibrate_noise_multiplier",
    "clip_tokens",
    "gaussian_epsilon",
    "parse_defense",
    "parse_defense_items",
    "parse_grad_defense",
    "per_release_epsilon",
]
