"""The `fedsplit` command end to end on the tiny model."""

import json

import torch
from peft import PeftModel
from typer.testing import CliRunner

from fedsplit.cli.main import app
from fedsplit.client.api import SplitModelForCausalLM
from fedsplit.model.loading import load_model

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_train_export_eval_generate_round_trip(tmp_path):
    run = tmp_path / "run"
    invoke(
        "train",
        "--local",
        "--model",
        "tiny-llama",
        "--head-layers",
        "1",
        "--tail-layers",
        "1",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--max-length",
        "48",
        "--eval-examples",
        "4",
        "--lr",
        "1e-2",
        "--out",
        str(run),
    )
    assert {p.name for p in run.iterdir()} >= {"head", "body", "tail", "summary.json"}
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["history"]) == 2 and "accuracy" in summary["after"]

    invoke("export", "--adapters", str(run), "--out", str(tmp_path / "merged"))
    base, _ = load_model("tiny-llama")
    unsplit = PeftModel.from_pretrained(base, str(tmp_path / "merged")).eval()
    split = SplitModelForCausalLM.from_pretrained("tiny-llama", head_layers=1, tail_layers=1, adapters=run)
    ids = torch.randint(10, 250, (1, 7))
    with torch.no_grad():
        expected = unsplit(ids).logits[:, -1]
        got = split.client.logits(ids, torch.zeros(1, dtype=torch.long))[:, -1]
    assert (expected - got).abs().max() <= 1e-4  # the exported adapter is the split model, body included

    invoke(
        "eval",
        "--model",
        "tiny-llama",
        "--adapters",
        str(run),
        "--head-layers",
        "1",
        "--tail-layers",
        "1",
        "--max-examples",
        "4",
        "--json",
        str(tmp_path / "m.json"),
    )
    assert "accuracy" in json.loads((tmp_path / "m.json").read_text())
    invoke(
        "generate",
        "--local",
        "--model",
        "tiny-llama",
        "--prompt",
        "hi",
        "--max-new-tokens",
        "3",
        "--adapters",
        str(run),
        "--head-layers",
        "1",
        "--tail-layers",
        "1",
    )


def test_train_and_eval_read_the_owners_own_jsonl_data(tmp_path):
    data = tmp_path / "own.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"q{i}?", "completion": f" a{i}"}) + "\n" for i in range(20))
    )
    run = tmp_path / "run"
    invoke(
        "train",
        "--local",
        "--model",
        "tiny-llama",
        "--head-layers",
        "1",
        "--tail-layers",
        "1",
        "--task",
        "jsonl",
        "--data",
        str(data),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--max-length",
        "32",
        "--eval-examples",
        "2",
        "--out",
        str(run),
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["data"] == str(data) and len(summary["history"]) == 2
    invoke(
        "eval",
        "--model",
        "tiny-llama",
        "--adapters",
        str(run),
        "--head-layers",
        "1",
        "--tail-layers",
        "1",
        "--task",
        "jsonl",
        "--data",
        str(data),
        "--max-examples",
        "2",
        "--json",
        str(tmp_path / "m.json"),
    )
    assert json.loads((tmp_path / "m.json").read_text())  # scored on the file's own test split


def test_user_errors_are_one_line_without_traceback():
    result = runner.invoke(app, ["generate", "--local", "--model", "no-such-model-xyz", "--prompt", "x"])
    assert result.exit_code == 2
    assert "error:" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["train", "--model", "tiny-llama"])
    assert result.exit_code == 2 and "exactly one of" in result.output
    result = runner.invoke(
        app,
        [
            "generate",
            "--local",
            "--model",
            "tiny-llama",
            "--prompt",
            "x",
            "--head-layers",
            "3",
            "--tail-layers",
            "3",
        ],
    )
    assert result.exit_code == 2 and "exceeds" in result.output


def test_train_refuses_values_no_run_can_use_before_loading_anything():
    for option, value, message in [
        ("--body-warmup", "-1", "--body-warmup must be 0 or more"),
        ("--steps", "0", "--steps must be positive"),
        ("--lr", "-0.1", "--lr must be positive"),
    ]:
        result = runner.invoke(app, ["train", "--local", "--model", "no-such-model-xyz", option, value])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output


def test_generate_runs_locally_in_bf16():
    output = invoke(
        "generate",
        "--local",
        "--model",
        "tiny-llama",
        "--dtype",
        "bf16",
        "--prompt",
        "hi",
        "--max-new-tokens",
        "4",
    )
    assert "Traceback" not in output and output.strip() != ""
