"""Benches on any device and dtype: the server gets the same placement, figures say where they ran."""

from types import SimpleNamespace

import pytest
import torch

from fedsplit.bench import generate
from fedsplit.bench.config import GenerateBenchConfig, MemoryBenchConfig, TrainModesConfig
from fedsplit.bench.procs import placement_args, placement_figures
from fedsplit.bench.simulate import SimulateConfig
from fedsplit.model.loading import load_config, load_model

# Small enough for two busy cores: a few tokens, a short context.
TINY_GENERATE = dict(
    model="tiny-llama", new_tokens=4, context=16, no_cache_tokens=1, head_layers=1, tail_layers=1
)


def test_the_server_is_told_the_placement_unless_it_is_auto():
    assert placement_args() == []
    assert placement_args("cuda:1", "bf16") == ["--device", "cuda:1", "--dtype", "bf16"]
    assert placement_args("auto", "fp16") == ["--dtype", "fp16"]


def test_figures_name_the_device_and_dtype_in_the_options_words():
    assert placement_figures(torch.device("cpu"), torch.bfloat16) == {"device": "cpu", "dtype": "bf16"}
    assert placement_figures("cpu", torch.float32) == {"device": "cpu", "dtype": "fp32"}


def test_simulated_clients_and_their_server_share_the_placement():
    cfg = SimulateConfig(model="tiny-llama", clients=2, device="cpu", dtype="bf16")
    assert {(s.device, s.dtype) for s in cfg.specs()} == {("cpu", "bf16")}
    assert cfg.serve_args()[-4:] == ["--device", "cpu", "--dtype", "bf16"]
    assert "--device" not in SimulateConfig().serve_args()  # auto: the server resolves it itself
    modes = TrainModesConfig(model="tiny-llama", dtype="fp16").simulate_config()
    assert (modes.device, modes.dtype) == ("auto", "fp16")


def test_parameter_bytes_count_the_whole_model_in_the_dtype():
    model, _ = load_model("tiny-llama")
    numel = sum(p.numel() for p in model.parameters())
    assert generate.parameter_bytes(load_config("tiny-llama"), torch.bfloat16) == 2 * numel
    assert generate.parameter_bytes(load_config("tiny-llama"), torch.float32) == 4 * numel


def test_an_unsplit_copy_that_does_not_fit_in_ram_is_refused_with_the_sizes(monkeypatch):
    monkeypatch.setattr(generate.psutil, "virtual_memory", lambda: SimpleNamespace(available=10 * 2**30))
    assert generate.unsplit_room(8 * 2**30, torch.device("cpu")) is None
    reason = generate.unsplit_room(12 * 2**30, torch.device("cpu"))
    assert reason == (
        "the unsplit model (12.0 GiB) does not fit beside the split one: 10.0 GiB of RAM available"
    )


@pytest.mark.e2e
def test_bench_generate_in_bf16_runs_split_and_unsplit_side_by_side():
    figures = generate.run(GenerateBenchConfig(**TINY_GENERATE, dtype="bf16"))
    assert (figures["device"], figures["dtype"]) == ("cpu", "bf16")
    assert figures["split_tokens_per_s"] > 0 and figures["centralized_tokens_per_s"] > 0
    assert figures["ratio"] == pytest.approx(
        figures["split_tokens_per_s"] / figures["centralized_tokens_per_s"]
    )
    assert 0 < figures["bytes_per_token_up"] <= figures["bytes_per_token_bound"]


@pytest.mark.e2e
def test_bench_generate_measures_the_split_model_alone_when_the_unsplit_copy_does_not_fit(monkeypatch):
    monkeypatch.setattr(generate.psutil, "virtual_memory", lambda: SimpleNamespace(available=0))
    figures = generate.run(GenerateBenchConfig(**TINY_GENERATE, dtype="bf16"))
    assert "does not fit beside the split one" in figures["centralized_skipped"]
    assert "ratio" not in figures and "centralized_tokens_per_s" not in figures
    assert figures["split_tokens_per_s"] > 0 and figures["bytes_per_token_up"] > 0


@pytest.mark.e2e
def test_bench_memory_in_bf16_reports_client_and_server_in_gib():
    from fedsplit.bench.memory import run

    figures = run(MemoryBenchConfig(model="tiny-llama", head_layers=1, tail_layers=1, dtype="bf16"))
    assert (figures["device"], figures["dtype"]) == ("cpu", "bf16")
    for role in ("unsplit", "server", "client"):
        assert figures[f"{role}_gib"] == pytest.approx(figures[f"{role}_rss_mib"] / 1024)
        assert f"{role}_weights_mib" in figures and f"{role}_cuda_max_allocated_gib" not in figures
    # tiny-llama: 4 blocks; p = q = 1 leaves the server 2 of them
    assert 0 < figures["server_params_m"] < figures["unsplit_params_m"]
