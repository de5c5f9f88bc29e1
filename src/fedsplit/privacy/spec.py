"""Text specs for defences (``"sparsify:0.2+gaussian:0.05"``) and :class:`DefenseConfig`.

A spec is what the CLI, config files and benchmark tables use to name a defence;
``parse_defense(d.name)`` rebuilds an equivalent defence from its canonical name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from fedsplit.privacy.accounting import ACCOUNTANTS, NEIGHBOURING, Neighbouring, calibrate_noise_multiplier
from fedsplit.privacy.adversarial import AdversarialDefense
from fedsplit.privacy.base import Compose, Defense, GradDefense
from fedsplit.privacy.bypass import BypassDefense
from fedsplit.privacy.dp import DPDefense
from fedsplit.privacy.mid import MIDDefense
from fedsplit.privacy.noise import DXDefense, GaussianDefense, GaussianGradDefense, LaplaceDefense
from fedsplit.privacy.nopeek import NoPeekDefense
from fedsplit.privacy.sparsify import SparsifyDefense
from fedsplit.privacy.text import TextDX

logger = logging.getLogger(__name__)

DEFENSE_SPEC_HELP = """\
Valid defence specs (join several with '+'; they apply left to right):
  none                          no defence
  gaussian:STD[:relative]       add N(0, STD^2) noise; ':relative' multiplies STD by each token's RMS
  laplace:B[:relative]          add Laplace(0, B) noise; ':relative' as for gaussian
  dp:clip=C,sigma=S             clip each token vector to L2 norm C, add N(0, (S*C)^2) noise
  dp:clip=C,epsilon=E[,delta=D][,steps=N][,sample_rate=Q]
                                same, with S calibrated to (E, D) over N steps at sample rate Q
                                (one release if steps is omitted; D defaults to 1e-05, Q to 1.0)
      optional dp keys: neighbouring=add_remove|replace, accountant=rdp|pld
  dp:S                          shorthand for dp:clip=1.0,sigma=S
  dx:ETA                        metric-DP noise with density ~ exp(-ETA*||z||)
  sparsify:F                    keep the top fraction F (0 < F <= 1) of |coordinates| of each token
  mid:D[,BETA]                  variational bottleneck of size D with KL weight BETA (default 0.001)
  nopeek:LAMBDA[,positions=N]   identity on the states; adds to the client's loss LAMBDA * the squared
                                distance correlation (bias-corrected) between the input embeddings and
                                the sent states, over at most N real positions (default 512)
  adv:LAMBDA[,rank=R][,buckets=N][,noise=S][,warmup=W][,positions=P]
                                adversarial training: a residual adapter of rank R (default 64) on the
                                states and a token inverter over N hashed classes (default 4096) trained
                                min-max through gradient reversal of weight LAMBDA; S: noise after the
                                adapter, relative to each token's RMS; W: forwards over which LAMBDA
                                ramps up; P: positions per batch for the inverter (default 1024)
  textdx:EPS[,k=K][,seed=S]     replace each input token x by y with P ~ exp(-EPS/2 * ||E_x - E_y||)
                                over the whole vocabulary, or over its K nearest tokens; must come first
  bypass                        the client removes from its own residual stream what the chain before
                                it added (e.g. noise); must come last
Examples: 'gaussian:0.05', 'gaussian:0.1:relative', 'dp:clip=1.0,sigma=0.5', 'sparsify:0.2+gaussian:0.05'"""

GRAD_SPEC_HELP = """\
Valid gradient-defence specs:
  none                          no defence
  gaussian:STD[:relative]       add N(0, STD^2) noise to the gradient sent to the server;
                                ':relative' multiplies STD by the largest per-token L2 norm of the gradient
Examples: 'gaussian:0.01', 'gaussian:0.1:relative'"""

_DP_KEYS = ("clip", "sigma", "epsilon", "delta", "steps", "sample_rate", "neighbouring", "accountant")
_MID_DEFAULT_BETA = 1e-3
_ADV_KEYS = {
    "rank": "integer",
    "buckets": "integer",
    "noise": "number",
    "warmup": "integer",
    "positions": "integer",
}
_NEEDS_PARAMETERS = ("gaussian", "laplace", "dp", "dx", "sparsify", "mid", "nopeek", "adv", "textdx")


class _SpecError(ValueError):
    """A problem with one item of a spec; re-raised with the whole spec and the grammar."""


def _is_none(spec: str | None) -> bool:
    return spec is None or spec.strip().lower() in ("", "none")


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise _SpecError(f"{what} must be a number, got {text!r}") from None


def _integer(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _SpecError(f"{what} must be an integer, got {text!r}") from None


def _first_and_keys(kind: str, body: str, keys: dict[str, str], first: str) -> dict[str, Any]:
    """``NUMBER[,key=value]*`` -> keyword arguments; ``keys`` maps each key to "number" or "integer"."""
    parts = [p.strip() for p in body.split(",")]
    if not parts[0] or "=" in parts[0]:
        raise _SpecError(f"{kind} starts with its {first}, e.g. {kind}:0.1")
    out: dict[str, Any] = {first: _number(parts[0], f"{kind} {first}")}
    for part in parts[1:]:
        key, sep, value = (x.strip() for x in part.partition("="))
        key = key.lower()
        if not sep or key not in keys:
            raise _SpecError(f"{kind} takes key=value options after its {first} (keys: {', '.join(keys)})")
        if key in out:
            raise _SpecError(f"{kind} key {key!r} given twice")
        parse = _integer if keys[key] == "integer" else _number
        out[key] = parse(value, f"{kind} {key}")
    return out


def _noise_args(kind: str, args: list[str]) -> dict[str, Any]:
    """``STD[:relative|:absolute]`` for gaussian/laplace on hidden states and gradients."""
    if len(args) not in (1, 2) or not args[0]:
        raise _SpecError(f"{kind} takes one number and an optional ':relative'")
    mode = args[1].lower() if len(args) == 2 else "absolute"
    if mode not in ("absolute", "relative"):
        raise _SpecError(f"{kind} mode must be 'relative' or 'absolute', got {args[1]!r}")
    key = "scale" if kind == "laplace" else "std"
    return {key: _number(args[0], f"{kind} {key}"), "relative": mode == "relative"}


def _dp_args(body: str) -> dict[str, Any]:
    """``clip=C,sigma=S`` / ``clip=C,epsilon=E,...`` / ``S``: the keyword arguments of :func:`_build_dp`."""
    values: dict[str, str] = {}
    for i, part in enumerate(p.strip() for p in body.split(",")):
        if "=" not in part:
            if i != 0 or not part:
                raise _SpecError(
                    f"dp arguments are key=value pairs (keys: {', '.join(_DP_KEYS)}), got {part!r}"
                )
            values["sigma"] = part
            continue
        key, value = (s.strip() for s in part.split("=", 1))
        key = key.lower()
        if key not in _DP_KEYS:
            raise _SpecError(f"unknown dp key {key!r} (keys: {', '.join(_DP_KEYS)})")
        if key in values:
            raise _SpecError(f"dp key {key!r} given twice")
        values[key] = value
    if ("sigma" in values) == ("epsilon" in values):
        raise _SpecError("dp needs exactly one of sigma=S or epsilon=E")
    calibration = {"delta", "steps", "sample_rate"} & values.keys()
    if "sigma" in values and calibration:
        raise _SpecError(
            f"dp {', '.join(sorted(calibration))} only apply with epsilon=E "
            "(pass them to privacy_spent() to report epsilon for a given sigma)"
        )
    out: dict[str, Any] = {"clip": _number(values.get("clip", "1.0"), "dp clip")}
    for key in ("sigma", "epsilon", "delta", "sample_rate"):
        if key in values:
            out[key] = _number(values[key], f"dp {key}")
    if "steps" in values:
        out["steps"] = _integer(values["steps"], "dp steps")
    for key, allowed in (("neighbouring", NEIGHBOURING), ("accountant", ACCOUNTANTS)):
        if key in values:
            if values[key].lower() not in allowed:
                raise _SpecError(f"dp {key} must be one of {', '.join(allowed)}, got {values[key]!r}")
            out[key] = values[key].lower()
    return out


def _parse_item(item: str) -> tuple[str, dict[str, Any]]:
    """One ``kind:args`` item -> (kind, keyword arguments), validated for syntax."""
    kind, sep, body = item.strip().partition(":")
    kind = kind.strip().lower()
    if not kind:
        raise _SpecError("empty defence (check for a stray '+')")
    if not sep and kind in _NEEDS_PARAMETERS:
        raise _SpecError(f"{kind} needs parameters, e.g. {kind}:...")
    if kind in ("gaussian", "laplace"):
        return kind, _noise_args(kind, [a.strip() for a in body.split(":")])
    if kind == "dp":
        return kind, _dp_args(body)
    if kind == "dx":
        return kind, {"eta": _number(body.strip(), "dx eta")}
    if kind == "sparsify":
        return kind, {"fraction": _number(body.strip(), "sparsify fraction")}
    if kind == "mid":
        parts = [p.strip() for p in body.split(",")]
        if len(parts) not in (1, 2):
            raise _SpecError("mid takes a bottleneck size and an optional beta: mid:D[,BETA]")
        beta = _number(parts[1], "mid beta") if len(parts) == 2 else _MID_DEFAULT_BETA
        return kind, {"bottleneck_dim": _integer(parts[0], "mid bottleneck size"), "beta": beta}
    if kind == "nopeek":
        return kind, _first_and_keys(kind, body, {"positions": "integer"}, "weight")
    if kind == "adv":
        return kind, _first_and_keys(kind, body, _ADV_KEYS, "weight")
    if kind == "textdx":
        return kind, _first_and_keys(kind, body, {"k": "integer", "seed": "integer"}, "epsilon")
    if kind == "bypass":
        if sep:
            raise _SpecError("bypass takes no parameters")
        return kind, {}
    if kind == "none":
        raise _SpecError("'none' cannot be combined with other defences")
    raise _SpecError(f"unknown defence {kind!r}")


def parse_defense_items(spec: str | None) -> list[tuple[str, dict[str, Any]]]:
    """Check a spec's syntax without building anything: a list of (kind, keyword arguments).

    Raises:
        ValueError: with the offending part and the list of valid forms.
    """
    if _is_none(spec):
        return []
    try:
        items = [_parse_item(item) for item in spec.split("+")]
        _check_order([kind for kind, _ in items])
        return items
    except _SpecError as err:
        raise ValueError(f"invalid defence spec {spec!r}: {err}\n{DEFENSE_SPEC_HELP}") from None


def _check_order(kinds: list[str]) -> None:
    """textdx acts on the ids before the head and bypass on the whole chain: first and last, once each."""
    for kind, where, index in (("textdx", "first", 0), ("bypass", "last", len(kinds) - 1)):
        if kinds.count(kind) > 1:
            raise _SpecError(f"{kind} can appear only once")
        if kind in kinds and kinds.index(kind) != index:
            raise _SpecError(f"{kind} must come {where} in the chain")


def _build_dp(
    clip: float,
    sigma: float | None = None,
    epsilon: float | None = None,
    delta: float = 1e-5,
    steps: int | None = None,
    sample_rate: float = 1.0,
    neighbouring: Neighbouring = "add_remove",
    accountant: str | None = None,
) -> DPDefense:
    if sigma is None:
        sigma = calibrate_noise_multiplier(epsilon, delta, steps, sample_rate, neighbouring, accountant)
    return DPDefense(clip=clip, sigma=sigma, neighbouring=neighbouring, accountant=accountant)


def _build(
    kind: str,
    kwargs: dict[str, Any],
    hidden_size: int | None,
    embedding: torch.Tensor | None = None,
    keep_ids: Iterable[int] = (),
) -> Defense:
    if kind == "gaussian":
        return GaussianDefense(**kwargs)
    if kind == "laplace":
        return LaplaceDefense(**kwargs)
    if kind == "dp":
        return _build_dp(**kwargs)
    if kind == "dx":
        return DXDefense(**kwargs)
    if kind == "sparsify":
        return SparsifyDefense(**kwargs)
    if kind == "mid":
        if hidden_size is None:
            raise _SpecError("mid needs the model's hidden size (pass hidden_size=...)")
        return MIDDefense(hidden_size=hidden_size, **kwargs)
    if kind == "nopeek":
        return NoPeekDefense(**kwargs)
    if kind == "adv":
        if hidden_size is None:
            raise _SpecError("adv needs the model's hidden size (pass hidden_size=...)")
        return AdversarialDefense(hidden_size=hidden_size, **kwargs)
    if kind == "textdx":
        if embedding is None:
            raise _SpecError("textdx needs the model's input embedding matrix (pass embedding=...)")
        return TextDX(embedding, keep_ids=keep_ids, **kwargs)
    if kind == "bypass":
        return BypassDefense()
    raise _SpecError(f"unknown defence {kind!r}")  # unreachable after _parse_item


def parse_defense(
    spec: str | None,
    hidden_size: int | None = None,
    embedding: torch.Tensor | None = None,
    keep_ids: Iterable[int] = (),
) -> Defense | None:
    """Build the defence described by ``spec`` (see :data:`DEFENSE_SPEC_HELP` for the grammar).

    Args:
        spec: e.g. ``"gaussian:0.05"``, ``"dp:clip=1.0,sigma=0.5"``, ``"sparsify:0.2+gaussian:0.05"``;
            ``None``, ``""`` or ``"none"`` mean no defence.
        hidden_size: the model's hidden size; required by ``mid`` and ``adv``.
        embedding: the model's input embedding matrix ``[V, E]``; required by ``textdx``.
        keep_ids: token ids ``textdx`` never replaces nor picks (the tokenizer's special ids).

    Returns:
        a :class:`Defense` (a :class:`Compose` for several items), or ``None``. A ``textdx``
        item is reachable as ``defense.token_defense`` (the client applies it to the ids
        before the head); ``None`` there means no token-level defence.

    Raises:
        ValueError: for a malformed spec or an out-of-range value; the message lists the valid forms.
    """
    items = parse_defense_items(spec)
    if not items:
        return None
    try:
        defenses = [_build(kind, kwargs, hidden_size, embedding, keep_ids) for kind, kwargs in items]
    except ValueError as err:  # out-of-range values raised by the constructors
        raise ValueError(f"invalid defence spec {spec!r}: {err}\n{DEFENSE_SPEC_HELP}") from None
    defense = defenses[0] if len(defenses) == 1 else Compose(defenses)
    logger.info("defence on hidden states: %s", defense.name)
    return defense


def parse_grad_defense(spec: str | None) -> GradDefense | None:
    """Build the gradient defence described by ``spec`` (``"gaussian:0.01"``, ``"gaussian:0.1:relative"``).

    Returns ``None`` for ``None``, ``""`` or ``"none"``.

    Raises:
        ValueError: for a malformed spec; the message lists the valid forms.
    """
    if _is_none(spec):
        return None
    kind, _, body = spec.strip().partition(":")
    try:
        if kind.strip().lower() != "gaussian":
            raise _SpecError(f"unknown gradient defence {kind.strip()!r}")
        grad_defense = GaussianGradDefense(**_noise_args("gaussian", [a.strip() for a in body.split(":")]))
    except ValueError as err:
        raise ValueError(f"invalid gradient-defence spec {spec!r}: {err}\n{GRAD_SPEC_HELP}") from None
    logger.info("defence on gradients: %s", grad_defense.name)
    return grad_defense


@dataclass
class DefenseConfig:
    """What the client does to the tensors it sends: one place for the CLI, config files and docs."""

    defense: str | None = field(
        default=None,
        metadata={
            "help": "defence applied to the hidden states sent to the server, e.g. 'gaussian:0.05', "
            "'dp:clip=1.0,sigma=0.5', 'sparsify:0.2+gaussian:0.05', 'mid:64,0.001'; 'none' for none"
        },
    )
    grad_defense: str | None = field(
        default=None,
        metadata={
            "help": "defence applied to the gradient sent to the server (protects labels), "
            "e.g. 'gaussian:0.01' or 'gaussian:0.1:relative'; 'none' for none"
        },
    )
    delta: float = field(
        default=1e-5,
        metadata={"help": "delta at which the epsilon of a DP defence is reported"},
    )

    def __post_init__(self) -> None:
        parse_defense_items(self.defense)  # syntax errors surface when the config is made
        if not _is_none(self.grad_defense):
            parse_grad_defense(self.grad_defense)
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")

    def build_defense(
        self,
        hidden_size: int | None = None,
        embedding: torch.Tensor | None = None,
        keep_ids: Iterable[int] = (),
    ) -> Defense | None:
        """The :class:`Defense` (see :func:`parse_defense` for ``hidden_size``, ``embedding``, ``keep_ids``)."""
        return parse_defense(self.defense, hidden_size, embedding, keep_ids)

    def build_grad_defense(self) -> GradDefense | None:
        """The :class:`GradDefense` for the gradients."""
        return parse_grad_defense(self.grad_defense)
