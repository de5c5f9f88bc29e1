"""Mistakes on the client side end the command with one line, not a traceback."""

import json
import os
import subprocess
import sys

import pytest

from fedsplit.bench.procs import free_port
from fedsplit.cli.config import ConfigError, load_dataclass_file
from fedsplit.cli.main import app
from fedsplit.client.config import TrainConfig
from fedsplit.model.loading import load_model


def run_cli(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        app(list(args), prog_name="fedsplit")
    return exc.value.code, capsys.readouterr().err


def one_line_error(code, err):
    lines = [
        line for line in err.splitlines() if line.strip() and " INFO " not in line and " WARNING " not in line
    ]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("bad.toml", "steps = [1,\n", "not valid TOML"),
        ("bad.yaml", "steps: [1,\n  lr: 2\n", "not valid YAML"),
        ("typo.toml", "stesp = 10\n", "unknown key 'stesp' (did you mean 'steps'?)"),
        ("type.yaml", "steps: ten\n", "'steps' must be an integer, got 'ten'"),
        ("list.yaml", "- steps\n", "expected a mapping"),
        ("conf.ini", "[train]\n", "must end in .toml, .yaml or .yml"),
    ],
)
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    line = one_line_error(
        *run_cli(capsys, "train", "--local", "--model", "tiny-llama", "--config", str(path))
    )
    assert message in line and name in line


def test_missing_config_file_is_a_one_line_error(tmp_path, capsys):
    line = one_line_error(*run_cli(capsys, "train", "--local", "--config", str(tmp_path / "nope.toml")))
    assert "cannot read config file" in line


def test_config_file_fills_train_config_and_command_line_wins(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        '[train]\nsteps = 12\nlr = 1e-3\nmodel = "tiny-llama"\nclip_norm = 1\ncheckpoint_every = 4\n'
    )
    values = load_dataclass_file(path, TrainConfig, "train")
    assert values == {"steps": 12, "lr": 1e-3, "model": "tiny-llama", "clip_norm": 1.0, "checkpoint_every": 4}
    with pytest.raises(ConfigError, match="'lr' must be a number"):
        path.write_text('lr = "fast"\n')
        load_dataclass_file(path, TrainConfig)


def test_resume_without_a_run_is_a_one_line_error(tmp_path, capsys):
    line = one_line_error(
        *run_cli(
            capsys,
            "train",
            "--local",
            "--model",
            "tiny-llama",
            "--head-layers",
            "1",
            "--tail-layers",
            "1",
            "--resume",
            "--out",
            str(tmp_path / "nothing"),
        )
    )
    assert "nothing to resume" in line


@pytest.mark.e2e
def test_unreachable_server_and_model_mismatch_are_one_line_errors_from_the_real_command(tmp_path, server):
    """The installed entry point, as a user runs it: no traceback for either mistake."""
    other = tmp_path / "other-model"  # same architecture, different config: a different fingerprint
    model, tokenizer = load_model("tiny-llama")
    model.config.rms_norm_eps = 1e-3
    model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    base = [
        sys.executable,
        "-m",
        "fedsplit.cli.main",
        "generate",
        "--prompt",
        "hi",
        "--head-layers",
        "1",
        "--tail-layers",
        "1",
        "--max-new-tokens",
        "2",
    ]
    dead = f"127.0.0.1:{free_port()}"
    cases = [
        (base + ["--model", "tiny-llama", "--server", dead], "cannot reach the fedsplit server"),
        (base + ["--model", str(other), "--server", server.address], "model mismatch"),
    ]
    for cmd, message in cases:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        line = one_line_error(proc.returncode, proc.stderr)
        assert message in line, proc.stderr
    assert json.loads((other / "config.json").read_text())["rms_norm_eps"] == 1e-3


@pytest.fixture
def server():
    from fedsplit.server.config import ServerConfig
    from fedsplit.server.runner import build_servicer, start_background

    srv = start_background(build_servicer(ServerConfig(model="tiny-llama", port=0)))
    yield srv
    srv.stop()


def test_train_options_on_the_command_line_win_over_the_config_file(tmp_path, monkeypatch):
    import fedsplit.client.train as train_module

    seen = {}

    def fake_training(cfg):
        seen["cfg"] = cfg
        return {"after": {}, "train_seconds": 0.0}

    monkeypatch.setattr(train_module, "run_training", fake_training)
    path = tmp_path / "run.toml"
    path.write_text('[train]\nsteps = 4\nlr = 1e-3\nmodel = "tiny-llama"\nclip_norm = 0.5\n')
    with pytest.raises(SystemExit) as exc:
        app(
            ["train", "--local", "--config", str(path), "--steps", "6", "--out", str(tmp_path / "o")],
            prog_name="fedsplit",
        )
    assert exc.value.code == 0
    cfg = seen["cfg"]
    assert (cfg.steps, cfg.lr, cfg.model, cfg.clip_norm, cfg.out) == (
        6,
        1e-3,
        "tiny-llama",
        0.5,
        str(tmp_path / "o"),
    )
