"""`fedsplit bench quality` end to end on the tiny model (a real server process, three training runs)."""

import json

import pytest

from fedsplit.bench.config import QualityBenchConfig
from fedsplit.bench.quality import run

pytestmark = pytest.mark.e2e


def test_bench_quality_reports_every_run_with_the_same_seed(tmp_path):
    figures = run(
        QualityBenchConfig(
            model="tiny-llama",
            task="sentiment",
            steps=3,
            batch_size=2,
            eval_examples=6,
            max_length=48,
            out=str(tmp_path),
            head_layers=1,
            tail_layers=1,
        )
    )
    for name in ("untrained", "centralized", "split", "split_noise"):
        assert 0.0 <= figures[f"{name}_accuracy"] <= 1.0
        assert figures[f"{name}_seconds"] >= 0.0
    assert figures["metric"] == "accuracy" and figures["wire_dtype"] == "fp32"
    assert figures["split_minus_centralized"] == figures["split_accuracy"] - figures["centralized_accuracy"]
    assert json.loads((tmp_path / "quality.json").read_text()) == figures
    table = (tmp_path / "quality.md").read_text()
    assert table.count("\n") == 6 and "| split+noise |" in table
    for run_name in ("centralized", "split", "split+noise"):  # adapters saved for `fedsplit export`
        assert (tmp_path / run_name / "tail").is_dir()
