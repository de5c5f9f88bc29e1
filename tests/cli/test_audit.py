"""`fedsplit audit` end to end on the tiny model: train a run, then audit it on the user's own texts."""

import json

from typer.testing import CliRunner

from fedsplit.cli.main import app

runner = CliRunner()

OWN = [
    "I feel so happy today, my dog came back.",
    "This movie was awful and boring.",
    "The weather is nice and warm.",
    "We went to the park yesterday.",
    "My boss yelled at me again!",
    "Can you recommend a good book?",
    "I finally passed the driving test",
    "She lost her job last week.",
    "The train was late by an hour.",
]


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_audit_of_a_trained_run_prints_the_headline_and_writes_json(tmp_path):
    run = tmp_path / "run"
    invoke(
        "train", "--local", "--model", "tiny-llama", "--head-layers", "1", "--tail-layers", "1",
        "--steps", "2", "--batch-size", "2", "--max-length", "48", "--eval-examples", "4",
        "--out", run,
    )  # fmt: skip
    data = tmp_path / "own.jsonl"
    data.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in OWN[:4]))
    data.write_text(data.read_text() + "".join(json.dumps({"text": t}) + "\n" for t in OWN[4:]))
    out = tmp_path / "out.json"
    output = invoke(
        "audit", "--local", "--adapters", run, "--data", data, "--n", "8", "--k", "4",
        "--attacks", "probe,nearest", "--quick", "--public-examples", "64", "--json", out,
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert output.count("a curious server recovers about") == 1
    assert (
        report["headline"]
        == f"a curious server recovers about {report['recovered_percent']} % of your tokens"
    )
    assert 0 <= report["recovered_percent"] <= 100
    assert report["model"] == "tiny-llama" and report["head_layers"] == 1  # from the run's summary
    assert report["scored"] == 4 and report["known_pairs"] == 4
    assert [row["tier"] for row in report["tiers"]] == ["public", "known-plaintext"]
    assert all(0.0 <= row["token_f1"] <= 1.0 for row in report["tiers"])
    assert len(report["examples"]) == 3
    assert report["label_attack"] == "not run (see fedsplit attack label)"  # the run is a classifier
    assert "label attack: not run" in output


def test_a_line_without_a_text_field_is_a_one_line_error(tmp_path):
    data = tmp_path / "own.jsonl"
    data.write_text('{"prompt": "fine"}\n{"body": "no text here"}\n')
    result = runner.invoke(app, ["audit", "--local", "--model", "tiny-llama", "--data", str(data)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0] == f'error: {data}:2: no "prompt" or "text" text field (keys: body)'


def test_audit_needs_one_of_local_or_server_and_data(tmp_path):
    result = runner.invoke(app, ["audit", "--data", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 2 and "give exactly one of --local or --server" in result.output
    result = runner.invoke(app, ["audit", "--local"])
    assert result.exit_code == 2 and "--data FILE" in result.output


def test_the_command_defaults_to_the_library_attacks():
    from fedsplit.attacks.audit import DEFAULT_AUDIT_ATTACKS
    from fedsplit.cli.audit import DEFAULT_ATTACKS

    assert DEFAULT_ATTACKS == DEFAULT_AUDIT_ATTACKS
