"""`fedsplit generate` and `fedsplit eval` take --defense as `fedsplit train` does, on the tiny model."""

import json
import logging

from typer.testing import CliRunner

from fedsplit.cli.main import app
from fedsplit.client.api import SplitModelForCausalLM

runner = CliRunner()
GENERATE = ["generate", "--local", "--model", "tiny-llama", "--head-layers", "1", "--tail-layers", "1"]
GENERATE += ["--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"]
EVAL = ["eval", "--model", "tiny-llama", "--head-layers", "1", "--tail-layers", "1", "--max-examples", "2"]
EVAL += ["--device", "cpu"]


def error_lines(result) -> list[str]:
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert "Traceback" not in result.output
    return [line for line in result.output.splitlines() if line.strip()]


def test_generate_sends_through_the_defense_it_is_given(monkeypatch):
    built = []
    original = SplitModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        lm = original(cls, *args, **kwargs)
        built.append(lm.client.defense)
        return lm

    monkeypatch.setattr(SplitModelForCausalLM, "from_pretrained", classmethod(spy))
    result = runner.invoke(app, [*GENERATE, "--defense", "gaussian:0.1:relative"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    result = runner.invoke(app, [*GENERATE, "--noise", "0.2"])  # deprecated alias of gaussian:0.2
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert [d.name for d in built] == ["gaussian:0.1:relative", "gaussian:0.2"]


def test_noise_and_defense_together_are_a_one_line_error():
    lines = error_lines(runner.invoke(app, [*GENERATE, "--noise", "0.1", "--defense", "gaussian:0.1"]))
    assert len(lines) == 1 and lines[0].startswith("error: give --defense or --noise, not both"), lines


def test_a_malformed_defense_is_a_one_line_error_naming_the_option():
    for command in (GENERATE, EVAL, ["train", "--local", "--model", "tiny-llama"]):
        lines = error_lines(runner.invoke(app, [*command, "--defense", "gaussain:0.1"]))
        assert len(lines) == 1 and lines[0].startswith("error: --defense 'gaussain:0.1' is not a defence"), (
            lines
        )
    lines = error_lines(runner.invoke(app, [*GENERATE, "--defense", "gaussian:-1"]))  # out of range: at build
    assert len(lines) == 1 and "gaussian:-1" in lines[0], lines


def test_eval_scores_the_split_model_through_the_defense(tmp_path, caplog):
    out = tmp_path / "m.json"
    with caplog.at_level(logging.INFO, logger="fedsplit.privacy.spec"):
        result = runner.invoke(app, [*EVAL, "--defense", "gaussian:0.1:relative", "--json", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "accuracy" in json.loads(out.read_text())
    assert "defence on hidden states: gaussian:0.1:relative" in caplog.text
