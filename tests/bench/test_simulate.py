"""`fedsplit simulate` end to end on the tiny model: processes, proxy, FedAvg, report."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedsplit.bench.simulate import SimulateConfig, run_simulation

pytestmark = pytest.mark.e2e


def test_simulate_trains_clients_with_different_partitions_and_writes_a_report(tmp_path):
    cfg = SimulateConfig(
        model="tiny-llama",
        clients=2,
        mode="server-hierarchical",
        partition="dirichlet:0.5",
        steps=4,
        batch_size=2,
        max_length=48,
        max_examples=200,
        head_layers=(1, 2),
        tail_layers=(1,),
        sync_every=2,
        rtt_ms=10,
        body_lr=1e-12,  # the server's body LoRA barely moves; head and tail train at the default lr
        round_timeout=30,
        eval_examples=16,
        out=str(tmp_path),
    )
    report = run_simulation(cfg, progress=False)
    run = report["runs"][0]
    assert [c["span"] for c in run["clients"]] == [[1, 3], [2, 3]]  # different p per client
    assert all(len(c["losses"]) == 4 and c["fedavg_rounds"] == 2 for c in run["clients"])
    assert 0.0 <= run["eval"]["accuracy"] <= 1.0
    for name in ("report.json", "report.md", "loss.png", "global/head", "global/body", "global/tail"):
        assert (tmp_path / name).exists(), name
    assert json.loads((tmp_path / "report.json").read_text())["config"]["mode"] == "server-hierarchical"
    server_log = (tmp_path / "server-server-hierarchical.log").read_text()
    assert "body sync round 2: averaged 2 replica(s)" in server_log
    assert server_log.count("lr 1e-12") == 2  # each client asked for the body lr it was given

    def lora_b(part: str) -> list:
        state = load_file(tmp_path / "global" / part / "adapter_model.safetensors")
        return [t for name, t in state.items() if "lora_B" in name]

    # B starts at zero; an AdamW step moves a weight by about lr at most
    assert lora_b("body") and max(t.abs().max().item() for t in lora_b("body")) < 1e-9
    assert max(t.abs().max().item() for t in lora_b("tail")) > 1e-5


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
            table[int(entry.name)] = (int(fields[1]), fields[0])
    return table


def _descendants(root: int) -> set[int]:
    table, found, frontier = _processes(), set(), {root}
    while frontier:
        frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier} - found
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    table = _processes()
    return {pid for pid in pids if pid in table and table[pid][1] != "Z"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_killed_simulate_leaves_no_server_or_client_processes(tmp_path, sig):
    cmd = [
        sys.executable,
        "-m",
        "fedsplit.cli.main",
        "simulate",
        "--model",
        "tiny-llama",
        "--clients",
        "2",
        "--mode",
        "sequential",
        "--steps",
        "400",
        "--batch-size",
        "2",
        "--max-length",
        "32",
        "--head-layers",
        "1",
        "--tail-layers",
        "1",
        "--max-examples",
        "200",
        "--eval-examples",
        "0",
        "--out",
        str(tmp_path),
    ]
    parent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and parent.poll() is None:
            children = _descendants(parent.pid)
            if len(children) >= 3 and (tmp_path / "server-sequential.log").exists():
                break  # the server and both clients are up
            time.sleep(0.5)
        assert parent.poll() is None and len(children) >= 3, "simulate did not start its processes"
        time.sleep(2)  # the clients are past their start-up
        children = _descendants(parent.pid)
        parent.send_signal(sig)
        parent.wait(timeout=60)
        deadline = time.monotonic() + 60
        while _alive(children) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _alive(children), f"left behind: {sorted(_alive(children))}"
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in _alive(children):  # whatever the test left behind
            os.kill(pid, signal.SIGKILL)
