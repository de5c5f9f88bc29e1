"""`fedsplit bench privacy` on the tiny model: rows, table, plots, and defences that bite."""

import json

from fedsplit.bench.config import AttackConfig, PrivacyBenchConfig
from fedsplit.bench.privacy import QUICK_GRID, pareto, sweep


def test_sweep_on_the_tiny_model_writes_rows_table_and_plots(tmp_path):
    grid = dict(
        QUICK_GRID,
        defenses=["none", "dx:20"],
        head_layers=[1],
        n=8,
        utility_n=8,
        label_n=16,
        extra=[("relaxation", 1, "none")],
    )
    summary = sweep(PrivacyBenchConfig(model="tiny-llama", out=str(tmp_path)), grid=grid, progress=False)
    rows = {(r["attack"], r["defense"]): r for r in summary["rows"]}
    assert set(rows) == {
        ("vmi", "none"),
        ("vmi", "dx:20"),
        ("relaxation", "none"),
        ("label", "none"),
        ("label", "gaussian:1:relative"),
    }
    assert rows[("vmi", "dx:20")]["token_f1"] < rows[("vmi", "none")]["token_f1"] - 0.3
    # the gradient noise costs utility
    assert rows[("label", "gaussian:1:relative")]["utility_grad_cosine"] < 0.5
    assert rows[("label", "none")]["utility_grad_cosine"] == 1.0
    for row in (rows[("vmi", "none")], rows[("vmi", "dx:20")]):  # label-word scores of the split model
        assert 0.0 <= row["utility_accuracy"] <= 1.0 and 0.0 <= row["utility_macro_f1"] <= 1.0
        assert row["utility_nll"] > 0
    assert json.loads((tmp_path / "privacy.json").read_text())["rows"] == summary["rows"]
    table = (tmp_path / "privacy.md").read_text()
    assert "| vmi | 1 | dx:20 |" in table and "| label | gaussian:1:relative |" in table
    for attack in ("vmi", "relaxation", "label"):
        assert (tmp_path / f"privacy_{attack}.png").stat().st_size > 1000


def test_pareto_keeps_the_points_nothing_beats_on_both_axes():
    points = [(0.9, 1.0), (0.5, 0.8), (0.6, 0.7), (0.1, 0.2), (0.1, 0.1)]
    assert pareto(points) == [0, 1, 3]


def test_gradient_defence_is_refused_for_attacks_that_do_not_observe_gradients():
    import pytest

    from fedsplit.bench.privacy import attack_with_cost

    with pytest.raises(ValueError, match="label attack only"):
        attack_with_cost(AttackConfig(attack="vmi", model="tiny-llama", n=2, grad_defense="gaussian:1"))
