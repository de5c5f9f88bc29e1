"""The row one attack run produces: shared by the inversion runner and the label attack."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class AttackResult:
    """One attack against one defence; :meth:`as_dict` gives the flat row benchmarks write."""

    attack: str
    defense: str
    head_layers: int
    n: int
    seconds: float
    token_precision: float | None = None
    token_recall: float | None = None
    token_f1: float | None = None
    rougeL: float | None = None
    bleu4: float | None = None
    label_accuracy: float | None = None
    auc: float | None = None
    model: str = ""
    task: str = ""
    samples: list[tuple[str, str]] = field(default_factory=list)  # (true, recovered) texts, a few

    def as_dict(self) -> dict[str, object]:
        """Flat dict of the scores that apply (token scores for inversion, label scores for ``label``)."""
        row = {k: v for k, v in asdict(self).items() if k != "samples" and v is not None}
        return row
