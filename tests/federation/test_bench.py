"""The train-modes figures and the simulate options a user can get wrong."""

import pytest

from fedsplit.federation.bench import body_lrs, summarise
from fedsplit.federation.simulate import SimulateConfig


def test_summary_reports_speedups_and_the_bound_per_rtt():
    runs = [
        {"rtt_ms": 20.0, "mode": "sequential", "wall_seconds": 60.0},
        {"rtt_ms": 20.0, "mode": "client-batch", "wall_seconds": 15.0},
        {"rtt_ms": 20.0, "mode": "server-hierarchical", "wall_seconds": 10.0},
        {"rtt_ms": 20.0, "mode": "server-hierarchical", "wall_seconds": 14.0},  # a repeat: the median counts
    ]
    (row,) = summarise(runs, compute_seconds=6.0)
    assert row["seq_s"] == 60.0 and row["sh_s"] == 12.0
    assert row["speedup_cb"] == pytest.approx(4.0) and row["speedup_sh"] == pytest.approx(5.0)
    assert row["bound"] == pytest.approx(10.0)  # sequential time / pure compute time
    assert row["sh_of_bound"] == pytest.approx(0.5)


def test_parallel_modes_body_lr_scales_with_the_clients_one_body_step_covers():
    sim = SimulateConfig(clients=8, lr=5e-4)
    assert body_lrs(sim, "linear") == pytest.approx(
        {"sequential": 5e-4, "client-batch": 4e-3, "server-hierarchical": 4e-3}
    )
    assert set(body_lrs(sim, "none").values()) == {5e-4}
    explicit = body_lrs(SimulateConfig(clients=4, lr=5e-4, body_lr=1e-4), "linear")
    assert explicit["sequential"] == pytest.approx(1e-4) and explicit["client-batch"] == pytest.approx(4e-4)
    with pytest.raises(ValueError, match="linear"):
        body_lrs(sim, "sqrt")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"mode": "parallel"}, "unknown training mode"),
        ({"mode": "independent"}, "federated mode"),
        ({"mode": "server-hierarchical", "steps": 15, "sync_every": 10}, "multiple of --sync-every"),
        ({"partition": "dirichlet:-1"}, "dirichlet"),
    ],
)
def test_simulate_options_that_cannot_work_say_what_to_change(options, message):
    with pytest.raises(ValueError, match=message):
        SimulateConfig(**options).check()
