"""The train-modes figures and the simulate options a user can get wrong."""

import os

import pytest

from fedsplit.bench.config import TrainModesConfig
from fedsplit.bench.simulate import SimulateConfig
from fedsplit.bench.train_modes import body_lrs, cpu_between, machine_cpu, summarise
from fedsplit.server.config import ServerConfig


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
    assert body_lrs(SimulateConfig(clients=4, lr=5e-4), "sqrt")["client-batch"] == pytest.approx(1e-3)
    explicit = body_lrs(SimulateConfig(clients=4, lr=5e-4, body_lr=1e-4), "linear")
    assert explicit["sequential"] == pytest.approx(1e-4) and explicit["client-batch"] == pytest.approx(4e-4)
    with pytest.raises(ValueError, match="linear"):
        body_lrs(sim, "cubic")


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


def test_machine_cpu_reads_busy_idle_and_steal_seconds_from_proc_stat():
    stat = "cpu  1000 0 200 5000 100 0 0 300 0 0\ncpu0 500 0 100 2500 50 0 0 150 0 0\nintr 1\n"
    cpu = machine_cpu(stat)
    hz = os.sysconf("SC_CLK_TCK")
    assert cpu == pytest.approx({"busy": 1200 / hz, "idle": 5100 / hz, "steal": 300 / hz})
    later = {"busy": cpu["busy"] + 3.0, "idle": cpu["idle"], "steal": cpu["steal"] + 1.0}
    span = cpu_between(cpu, later, seconds=2.0)
    assert span == pytest.approx(
        {"busy_cores": 1.5, "steal_s": 1.0, "steal_cores": 0.5, "cores": os.cpu_count()}
    )
    assert machine_cpu("intr 1\n") is None and cpu_between(None, later, 2.0) == {}


def test_summary_lists_each_runs_busy_cores_and_steal_when_measured():
    runs = [
        {"rtt_ms": 0.0, "mode": m, "wall_seconds": w, "machine": {"busy_cores": b, "steal_s": st, "cores": 2}}
        for m, w, b, st in [
            ("sequential", 10.0, 1.0, 0.0),
            ("client-batch", 5.0, 1.9, 0.2),
            ("server-hierarchical", 5.0, 1.8, 2.0),
        ]
    ]
    (row,) = summarise(runs, compute_seconds=4.0)
    assert row["steal_s"] == {"seq": [0.0], "cb": [0.2], "sh": [2.0]}
    assert row["busy_cores"]["cb"] == [1.9]
    assert row["sh_of_bound"] == pytest.approx(0.8)  # pure compute / wall
    assert row["sh_of_bound_less_steal"] == pytest.approx(1.0)  # 2 s stolen from 2 cores: 1 s lost
    (plain,) = summarise([{k: v for k, v in r.items() if k != "machine"} for r in runs], 4.0)
    assert "steal_s" not in plain and "sh_of_bound_less_steal" not in plain


def test_unset_train_modes_options_take_the_models_bench_defaults():
    tiny = TrainModesConfig(model="tiny-llama", clients=4, head_layers=2).resolved()
    assert (tiny.steps, tiny.max_length, tiny.sync_every, tiny.tail_layers) == (40, 48, 10, 1)
    assert (tiny.head_layers, tiny.eval_examples, tiny.server_threads) == (2, 200, 1)  # given: kept
    other = TrainModesConfig(model="some/model", steps=0, server_threads=0, eval_examples=0).resolved()
    assert (other.steps, other.sync_every, other.server_threads, other.eval_examples) == (4, 2, 0, 0)


def test_every_train_mode_averages_heads_and_tails_at_the_body_sync_period():
    sim = TrainModesConfig(model="tiny-llama", sync_every=5, rtt_ms=(0.0,)).simulate_config()
    assert (sim.sync_every, sim.fedavg_every, sim.head_layers, sim.eval_examples) == (5, 5, (1,), 0)


def test_simulate_leaves_the_hierarchical_fedavg_period_to_the_servers_rule():
    def served(cfg: SimulateConfig) -> ServerConfig:
        args = cfg.serve_args()
        value = {args[i]: args[i + 1] for i in range(0, len(args), 2)}
        return ServerConfig(
            mode=value["--mode"],
            sync_every=int(value["--sync-every"]),
            fedavg_every=int(value["--fedavg-every"]),
        )

    # server-hierarchical: heads and tails are averaged at the body syncs, whatever fedavg_every says
    hierarchical = SimulateConfig(mode="server-hierarchical", sync_every=5, fedavg_every=10)
    assert served(hierarchical).fedavg_period() == 5
    assert served(SimulateConfig(mode="sequential", sync_every=5, fedavg_every=10)).fedavg_period() == 10
