"""`fedsplit simulate` end to end on the tiny model: processes, proxy, FedAvg, report."""

import json

from safetensors.torch import load_file

from fedsplit.federation.simulate import SimulateConfig, run_simulation


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
