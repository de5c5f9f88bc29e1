"""`fedsplit bench capacity`: synthetic sessions against a real server process on the tiny model."""

import json

import pytest
from typer.testing import CliRunner

from fedsplit.bench.config import CapacityBenchConfig, parse_session_counts
from fedsplit.cli.main import app

runner = CliRunner()


def test_capacity_reports_throughput_latency_and_ratios_per_session_count(tmp_path):
    out = tmp_path / "capacity.json"
    result = runner.invoke(
        app,
        [
            "bench",
            "capacity",
            "--model",
            "tiny-llama",
            "--sessions",
            "1,2",
            "--head-layers",
            "1",
            "--tail-layers",
            "1",
            "--prompt-tokens",
            "8",
            "--new-tokens",
            "6",
            "--train-steps",
            "2",
            "--train-length",
            "8",
            "--device",
            "cpu",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    figures = json.loads(out.read_text())
    assert figures["sessions"] == "1,2" and figures["stages"] == "1" and figures["span"] == "1:3"
    for n in (1, 2):
        assert figures[f"decode_tokens_per_s_n{n}"] > 0
        assert figures[f"token_p99_ms_n{n}"] >= figures[f"token_p50_ms_n{n}"] > 0
        assert figures[f"prefill_mean_ms_n{n}"] > 0
        assert figures[f"train_steps_per_s_n{n}"] > 0
        assert figures[f"train_step_p99_ms_n{n}"] >= figures[f"train_step_p50_ms_n{n}"] > 0
        assert figures[f"errors_n{n}"] == 0
        assert f"decode_ratio_n{n}" in figures and f"train_ratio_n{n}" in figures
    assert figures["decode_ratio_n1"] == pytest.approx(1.0) and figures["train_ratio_n1"] == pytest.approx(
        1.0
    )
    assert figures["first_error"] == ""
    assert "vs 1 session" in result.output


def test_capacity_without_ray_refuses_stages_in_one_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails
    result = runner.invoke(app, ["bench", "capacity", "--model", "tiny-llama", "--stages", "1,2"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--stages 1,2" in lines[0] and "need Ray" in lines[0]


@pytest.mark.ray
def test_capacity_measures_one_process_and_two_stages_and_the_stage_hop(tmp_path):
    out = tmp_path / "capacity.json"
    args = ["--model", "tiny-llama", "--sessions", "2", "--stages", "1,2", "--head-layers", "1"]
    args += ["--tail-layers", "1", "--prompt-tokens", "8", "--new-tokens", "6", "--train-steps", "1"]
    args += ["--train-length", "8", "--device", "cpu", "--json", str(out)]
    result = runner.invoke(app, ["bench", "capacity", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    figures = json.loads(out.read_text())
    assert figures["stages"] == "1,2" and figures["first_error"] == ""
    for prefix in ("", "s2_"):
        for n in (1, 2):
            assert figures[f"{prefix}decode_tokens_per_s_n{n}"] > 0
            assert figures[f"{prefix}train_steps_per_s_n{n}"] > 0
            assert figures[f"{prefix}errors_n{n}"] == 0
    hop = figures["stage_hop_ms_s2"]
    assert hop == pytest.approx(figures["s2_token_p50_ms_n1"] - figures["token_p50_ms_n1"])
    assert "2 Ray stages" in result.output and "a stage hop adds" in result.output


def test_session_counts_are_positive_sorted_and_unique():
    assert parse_session_counts("8,1,8,32") == (1, 8, 32)
    for bad in ("0,4", "a", ""):
        with pytest.raises(ValueError, match="positive integers"):
            parse_session_counts(bad)
    with pytest.raises(ValueError, match="--new-tokens"):
        CapacityBenchConfig(new_tokens=0).check()
