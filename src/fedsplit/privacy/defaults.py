"""The defence a client uses when none is asked for, and the warning an undefended client logs.

Every command that sends hidden states (``fedsplit train``, ``generate``, ``eval``) and the
Python API (``SplitModelForCausalLM.from_pretrained``) resolve the user's defence option
through :func:`resolve_defense_spec`: unset means :data:`DEFAULT_DEFENSE`, ``"none"`` means
no defence, anything else is a spec (``docs/privacy.md``).

A split client built without a defence calls :func:`warn_undefended`, which logs once per
process how much of its input a curious server can read back (:data:`UNDEFENDED_F1`).
Tests and tools change the default with ``monkeypatch.setattr(fedsplit.privacy.defaults,
"DEFAULT_DEFENSE", ...)``: it is read when a spec is resolved, not copied at import.
"""

from __future__ import annotations

import logging

log = logging.getLogger("fedsplit.privacy")

DEFAULT_DEFENSE: str | None = None
"""The defence spec used when the user gives none (``None``: no defence)."""

# Token F1 of the strongest public-tier attack against an undefended client with p head layers,
# SmolLM2-135M fine-tuned on sentiment (`fedsplit bench privacy --after-finetune`, docs/privacy.md).
UNDEFENDED_F1: dict[int, float] = {2: 0.950, 4: 0.916, 6: 0.888}

_warned = False  # warn_undefended logs once per process


def resolve_defense_spec(option: str | None) -> str | None:
    """The defence spec a user's option stands for, or ``None`` for no defence.

    Args:
        option: ``None`` (the option was not given) means :data:`DEFAULT_DEFENSE`; ``"none"``
            (any case) or ``""`` means no defence; anything else is returned as it is
            (its syntax is checked when it is parsed).
    """
    if option is None:
        return DEFAULT_DEFENSE
    if option.strip().lower() in ("", "none"):
        return None
    return option


def undefended_message(head_layers: int) -> str:
    """What :func:`warn_undefended` logs for a client with ``head_layers`` blocks in its head."""
    advice = "pass --defense SPEC (defense= in the Python API; see docs/privacy.md)"
    if not UNDEFENDED_F1:
        return (
            f"hidden states leave this client undefended: a curious server can read its input back; {advice}"
        )
    measured = min(UNDEFENDED_F1, key=lambda p: (abs(p - head_layers), p))  # a tie: the shallower head
    where = (
        f"p={head_layers}"
        if measured == head_layers
        else f"p={measured} (the nearest measured to p={head_layers})"
    )
    return (
        f"hidden states leave this client undefended: at {where} a curious server's strongest public "
        f"attack recovers about {UNDEFENDED_F1[measured]:.0%} of the tokens "
        f"(fedsplit bench privacy --after-finetune); {advice}"
    )


def warn_undefended(head_layers: int) -> None:
    """Log, once per process, that a split client with ``head_layers`` head blocks sends undefended states."""
    global _warned
    if _warned:
        return
    _warned = True
    log.warning(undefended_message(head_layers))
