"""Privacy accounting for the clipped Gaussian mechanism, via Google's ``dp_accounting``.

The numbers here are never computed by hand: every epsilon comes from
``dp_accounting`` (RDP or PLD accountants for a training run, the analytic Gaussian
mechanism of Balle & Wang 2018 for a single release).

Conventions
-----------
A *noise multiplier* ``sigma`` is the noise standard deviation divided by the clipping
norm ``C``. Two neighbouring relations are supported:

``"add_remove"`` (default)
    One record's clipped vector is added to or removed from what is released; the
    L2 sensitivity is ``C``. This is the DP-SGD convention (RDP accountant,
    ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`` composed ``steps`` times).
``"replace"``
    One record's clipped vector is replaced by any other clipped vector; the L2
    sensitivity is ``2C``. Stricter; accounted with the PLD accountant
    (``REPLACE_ONE``), as the RDP accountant does not support it with Poisson
    sampling.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import dp_accounting
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

logger = logging.getLogger(__name__)

Neighbouring = Literal["add_remove", "replace"]
NEIGHBOURING: tuple[str, ...] = ("add_remove", "replace")
ACCOUNTANTS: tuple[str, ...] = ("rdp", "pld")


def _check(noise_multiplier: float, steps: int, sample_rate: float, delta: float, neighbouring: str) -> None:
    if noise_multiplier < 0:
        raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if neighbouring not in NEIGHBOURING:
        raise ValueError(f"neighbouring must be one of {NEIGHBOURING}, got {neighbouring!r}")


def _make_accountant(neighbouring: str, accountant: str | None) -> dp_accounting.PrivacyAccountant:
    """The accountant for a neighbouring relation ("rdp" by default for add/remove, PLD for replace)."""
    if accountant is None:
        accountant = "rdp" if neighbouring == "add_remove" else "pld"
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if neighbouring == "replace":
        if accountant == "rdp":
            raise ValueError(
                "the RDP accountant does not support neighbouring='replace'; use accountant='pld'"
            )
        return PLDAccountant(dp_accounting.NeighboringRelation.REPLACE_ONE)
    if accountant == "pld":
        return PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    return RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)


def gaussian_event(noise_multiplier: float, steps: int, sample_rate: float = 1.0) -> dp_accounting.DpEvent:
    """The ``DpEvent`` of ``steps`` Poisson-sampled releases of a Gaussian mechanism."""
    step = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    return dp_accounting.SelfComposedDpEvent(step, steps)


def gaussian_epsilon(
    noise_multiplier: float,
    steps: int,
    sample_rate: float = 1.0,
    delta: float = 1e-5,
    neighbouring: Neighbouring = "add_remove",
    accountant: str | None = None,
) -> float:
    """Epsilon after ``steps`` releases of the (Poisson-subsampled) clipped Gaussian mechanism.

    Args:
        noise_multiplier: noise std divided by the clipping norm.
        steps: number of releases (training steps) composed.
        sample_rate: probability that a given record takes part in a step
            (batch size / data-set size under Poisson sampling); 1.0 means no
            amplification by subsampling.
        delta: target delta.
        neighbouring: ``"add_remove"`` or ``"replace"`` (see the module docstring).
        accountant: ``"rdp"`` or ``"pld"``; default RDP for add/remove, PLD for replace.

    Returns:
        epsilon (``0.0`` for zero steps, ``inf`` for a zero noise multiplier).
    """
    _check(noise_multiplier, steps, sample_rate, delta, neighbouring)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc = _make_accountant(neighbouring, accountant)
    acc.compose(gaussian_event(noise_multiplier, steps, sample_rate))
    return float(acc.get_epsilon(delta))


def per_release_epsilon(
    noise_multiplier: float, delta: float = 1e-5, neighbouring: Neighbouring = "add_remove"
) -> float:
    """Epsilon of one release of the clipped Gaussian mechanism (analytic Gaussian mechanism, tight)."""
    _check(noise_multiplier, 1, 1.0, delta, neighbouring)
    if noise_multiplier == 0:
        return math.inf
    # Under "replace" two clipped vectors can be 2C apart: the effective multiplier halves.
    effective = noise_multiplier if neighbouring == "add_remove" else noise_multiplier / 2.0
    return float(dp_accounting.get_epsilon_gaussian(effective, delta))


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float = 1e-5,
    steps: int | None = None,
    sample_rate: float = 1.0,
    neighbouring: Neighbouring = "add_remove",
    accountant: str | None = None,
) -> float:
    """The smallest noise multiplier that meets ``(target_epsilon, delta)``.

    With ``steps=None`` the budget is for a single release (analytic Gaussian
    mechanism); otherwise for ``steps`` Poisson-sampled releases at ``sample_rate``.
    """
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    if steps is None:
        _check(1.0, 1, 1.0, delta, neighbouring)
        sigma = float(dp_accounting.get_sigma_gaussian(target_epsilon, delta))
        sigma = sigma if neighbouring == "add_remove" else 2.0 * sigma
    else:
        _check(1.0, steps, sample_rate, delta, neighbouring)
        if steps == 0:
            raise ValueError("steps must be >= 1 to calibrate a noise multiplier")
        sigma = float(
            dp_accounting.calibrate_dp_mechanism(
                lambda: _make_accountant(neighbouring, accountant),
                lambda s: gaussian_event(s, steps, sample_rate),
                target_epsilon,
                delta,
                dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
                tol=1e-4,
            )
        )
    logger.info(
        "calibrated noise multiplier %.4f for epsilon=%g delta=%g steps=%s sample_rate=%g (%s)",
        sigma,
        target_epsilon,
        delta,
        steps,
        sample_rate,
        neighbouring,
    )
    return sigma
