"""A per-position probe: the cheapest learned attacker, each token read off its own hidden vector.

The probe sees one hidden vector at a time (no context, no position), normalises it
and maps it to logits over the tokens seen in public text: ``linear`` is one linear
layer, ``mlp`` adds a residual GELU block in front (it starts as the linear probe).
It is trained exactly as the learned inverter is (:func:`~fedsplit.attacks.learned.train_inverter`):
public text through the attacker's copy of the head, the defence re-applied at every
step with fresh draws, cross entropy on the real tokens. Because it has no context it
trains on a flat set of token vectors (no padding wasted) and is cheap enough to be a
baseline every defence is measured against: if a linear read of the hidden state
recovers the text, a defence that only stops slower attacks has not helped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .inversion import embedding_matrix, real_mask
from .learned import fit_per_position, head_outputs

log = logging.getLogger(__name__)

PROBE_KINDS = ("linear", "mlp", "tied")
DEFAULT_PROBE_STEPS = 300
DEFAULT_PROBE_LR = {"linear": 1e-2, "mlp": 3e-3, "tied": 3e-3}


class Probe(nn.Module):
    """Hidden vectors ``[..., H]`` -> logits over a sub-vocabulary ``[..., K]``, each position alone.

    Args:
        hidden_size: ``H`` of the head whose output is read.
        vocab_ids: the model token id of each output class, ``LongTensor[K]``.
        kind: ``"linear"``, ``"mlp"`` (a residual GELU block before the output layer) or
            ``"tied"``: a learned square map into the embedding space, scored against the
            normalised embedding rows of *every* token, so the probe also names tokens the
            public text never showed it (training still uses the seen classes only; decoding
            uses :attr:`decode_ids`, the whole vocabulary less the ignored ids).
        width: the MLP's inner width (default ``min(4 H, 1024)``).
        embedding: optional public embedding table ``[V, H]``; the output layer starts
            from its normalised rows for ``vocab_ids`` (the residual stream at small p
            still points at the input token's embedding).
    """

    def __init__(
        self,
        hidden_size: int,
        vocab_ids: torch.Tensor,
        kind: str = "linear",
        width: int | None = None,
        embedding: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if kind not in PROBE_KINDS:
            raise ValueError(f"probe kind must be one of {', '.join(PROBE_KINDS)}, got {kind!r}")
        self.kind = kind
        self.register_buffer("vocab_ids", vocab_ids.to(torch.long).clone())
        # SmolLM2's states have a few coordinates ~20x the rest: normalise per token first.
        self.in_norm = nn.LayerNorm(hidden_size)
        self.mlp = None
        self.out = None
        if kind == "tied":
            if embedding is None or embedding.shape[1] != hidden_size:
                raise ValueError("a tied probe needs the public embedding table [V, H]")
            self.map = nn.Linear(hidden_size, hidden_size, bias=False)
            with torch.no_grad():
                self.map.weight.copy_(torch.eye(hidden_size))
            self.log_scale = nn.Parameter(torch.tensor(3.0))
            self.bias = nn.Parameter(torch.zeros(embedding.shape[0]))
            self.register_buffer("table", F.normalize(embedding.detach().float(), dim=-1), persistent=False)
            self.register_buffer("decode_ids", self.vocab_ids.clone())
            return
        if kind == "mlp":
            width = width or min(4 * hidden_size, 1024)
            self.mlp = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, hidden_size))
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)
        self.out = nn.Linear(hidden_size, len(vocab_ids))
        if embedding is not None and embedding.shape[1] == hidden_size:
            with torch.no_grad():
                rows = F.normalize(embedding[self.vocab_ids.to(embedding.device)].float(), dim=-1)
                scale = self.out.weight.norm(dim=-1, keepdim=True).mean()
                self.out.weight.copy_(rows.to(self.out.weight.device) * scale)

    def forward(
        self, hidden: torch.Tensor, pad_lengths: torch.Tensor | None = None, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``[..., K]`` over :attr:`vocab_ids` (or over ``ids``, tied probes only);
        ``pad_lengths`` is accepted and unused."""
        if self.kind == "tied":
            ids = self.vocab_ids if ids is None else ids
            x = F.normalize(self.map(self.in_norm(hidden.to(self.table.dtype))), dim=-1)
            return self.log_scale.exp() * x @ self.table[ids].T + self.bias[ids]
        x = self.in_norm(hidden.to(self.out.weight.dtype))
        if self.mlp is not None:
            x = x + self.mlp(x)
        return self.out(x)

    def grow(self, extra: torch.Tensor) -> None:
        """Add ``extra`` token ids to the trained classes (a tied probe's rows already exist)."""
        new = extra[~torch.isin(extra.to(self.vocab_ids.device), self.vocab_ids)].to(self.vocab_ids.device)
        self.vocab_ids = torch.cat([self.vocab_ids, new])

    @torch.no_grad()
    def decode(
        self, hidden: torch.Tensor, pad_lengths: torch.Tensor | None = None, batch_size: int = 64
    ) -> torch.Tensor:
        """Most likely model token id at every position, ``[B, T]``, on ``hidden``'s device."""
        was_training = self.training
        self.eval()
        names = self.decode_ids if self.kind == "tied" else self.vocab_ids
        if self.kind == "tied":  # logits over the whole vocabulary: fewer rows at a time
            batch_size = max(1, min(batch_size, 8))
        device = names.device
        out = [
            names[
                self(
                    hidden[s : s + batch_size].to(device), ids=names if self.kind == "tied" else None
                ).argmax(-1)
            ].to(hidden.device)
            for s in range(0, hidden.shape[0], batch_size)
        ]
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(hidden.shape[:2], dtype=torch.long)


def seen_vocabulary(
    ids_and_pads: Iterable[tuple[torch.Tensor, torch.Tensor]], ignore_ids: Iterable[int] = ()
) -> torch.Tensor:
    """Sorted token ids that occur at real positions of the rows, less ``ignore_ids`` (on the CPU)."""
    seen = [ids[real_mask(pad, ids.shape[1])].cpu() for ids, pad in ids_and_pads]
    if not seen:
        return torch.zeros(0, dtype=torch.long)
    tokens = torch.unique(torch.cat(seen))
    ignore = torch.tensor(sorted({int(i) for i in ignore_ids}), dtype=torch.long)
    return tokens[~torch.isin(tokens, ignore)]


def class_lookup(vocab_ids: torch.Tensor, table_size: int) -> torch.Tensor:
    """``[V]`` map from model token id to output class; ``-100`` (ignored by the loss) elsewhere."""
    lookup = torch.full((table_size,), -100, dtype=torch.long, device=vocab_ids.device)
    lookup[vocab_ids] = torch.arange(len(vocab_ids), device=vocab_ids.device)
    return lookup


def train_probe(
    head: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    defense: nn.Module | None = None,
    *,
    kind: str = "linear",
    steps: int = DEFAULT_PROBE_STEPS,
    lr: float | None = None,
    width: int | None = None,
    seed: int = 0,
    ignore_ids: Iterable[int] = (),
    vocab_size: int | None = None,
    progress: bool = False,
) -> Probe:
    """Train a :class:`Probe` on public text passed through ``head`` and the defence.

    Args:
        head: the attacker's head (the public one; the client's own at the oracle tier).
        batches: ``(input_ids [b, T], pad_lengths [b])`` batches of public text, left-padded
            (:func:`~fedsplit.attacks.runner.token_batches`); moved to the head's device and
            run through it once (the clean outputs are cached).
        defense: the attacker's own instance of the client's defence mechanism, applied anew
            at every step (fresh noise draws).
        kind: ``"linear"`` or ``"mlp"``.
        steps: AdamW steps, one cached batch each (cycling in a seeded random order).
        lr: peak learning rate (warm-up then cosine decay); default per kind.
        width: the MLP's inner width.
        seed: seeds the initialisation, the batch order and the defence's draws.
        ignore_ids: token ids that are never a class (special tokens).
        vocab_size: the tokenizer's length: a tied probe decodes over ids below it (default: the
            whole embedding table).

    Returns:
        The trained probe (fp32, on the head's device), in eval mode. Its classes are the
        tokens seen in the public text: a token never seen cannot be learned.
    """
    if kind not in PROBE_KINDS:
        raise ValueError(f"probe kind must be one of {', '.join(PROBE_KINDS)}, got {kind!r}")
    table = embedding_matrix(head)
    device = table.device
    cached = head_outputs(head, [(i.to(device), p.to(device)) for i, p in batches], progress, defense)
    if not cached:
        raise ValueError("train_probe needs at least one batch of public text")
    vocab_ids = seen_vocabulary(((ids, pad) for ids, pad, _ in cached), ignore_ids)
    if len(vocab_ids) == 0:
        raise ValueError("the public text has no token that is not ignored")
    lookup = class_lookup(vocab_ids.to(device), table.shape[0])
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        probe = Probe(table.shape[1], vocab_ids, kind=kind, width=width, embedding=table).to(device)
        if kind == "tied":
            everything = torch.arange(min(vocab_size or table.shape[0], table.shape[0]), device=device)
            ignore = torch.tensor(sorted({int(i) for i in ignore_ids}), dtype=torch.long, device=device)
            probe.decode_ids = everything[~torch.isin(everything, ignore)]
        loss = fit_per_position(
            probe,
            cached,
            lookup,
            defense,
            steps=steps,
            lr=DEFAULT_PROBE_LR[kind] if lr is None else lr,
            progress=progress,
            clip_norm=None,
            desc="train probe",
        )
    if kind == "tied":  # a token never trained on gets a low prior (it is rarer than the public text's)
        with torch.no_grad():
            unseen = torch.ones_like(probe.bias, dtype=torch.bool)
            unseen[probe.vocab_ids] = False
            probe.bias[unseen] = torch.quantile(probe.bias[probe.vocab_ids].float(), 0.1)
    log.info("%s probe: %d classes, %d steps, last loss %.3f", kind, len(vocab_ids), steps, loss)
    return probe.eval()


__all__ = ["DEFAULT_PROBE_STEPS", "PROBE_KINDS", "Probe", "class_lookup", "seen_vocabulary", "train_probe"]
