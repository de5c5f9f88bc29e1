"""Every config field is a command option, and every other option is a declared extra."""

import dataclasses
from typing import Optional

import pytest
import typer

from fedsplit.bench.config import (
    AttackConfig,
    CapacityBenchConfig,
    DemoConfig,
    GenerateBenchConfig,
    LoadBenchConfig,
    MemoryBenchConfig,
    PrivacyBenchConfig,
    QualityBenchConfig,
    TrainModesConfig,
)
from fedsplit.bench.simulate import SimulateConfig
from fedsplit.cli.audit import AuditConfig
from fedsplit.cli.main import app
from fedsplit.cli.options import config_options, field_default, flag_of
from fedsplit.client.config import EvalConfig, GenerateConfig, TrainConfig
from fedsplit.server.config import ServerConfig, format_size, parse_size

JSON = {"json_out"}
# command -> (its config dataclass, the options it declares besides the fields)
COMMANDS = {
    "train": (TrainConfig, {"local", "config"}),
    "audit": (AuditConfig, {"local", "json_out"}),
    "eval": (EvalConfig, JSON),
    "generate": (GenerateConfig, {"prompt", "local"}),
    "serve": (ServerConfig, {"tls_cert", "tls_key", "tokens", "threads", "config"}),
    "simulate": (SimulateConfig, {"config"}),
    "attack": (AttackConfig, JSON),
    "demo": (DemoConfig, set()),
    "bench generate": (GenerateBenchConfig, JSON),
    "bench load": (LoadBenchConfig, JSON),
    "bench memory": (MemoryBenchConfig, JSON),
    "bench quality": (QualityBenchConfig, JSON),
    "bench privacy": (PrivacyBenchConfig, JSON),
    "bench train-modes": (TrainModesConfig, JSON),
    "bench capacity": (CapacityBenchConfig, JSON),
}


def commands(typer_app) -> dict:
    """Every leaf command of the app, by its path ("bench load")."""
    found, stack = {}, [("", typer.main.get_command(typer_app))]
    while stack:
        path, command = stack.pop()
        subcommands = getattr(command, "commands", None)
        if subcommands is None:
            found[path] = command
        else:
            stack += [(f"{path} {name}".strip(), sub) for name, sub in subcommands.items()]
    return found


def coverage_problems(command, cls, extras: set[str]) -> list[str]:
    """What is wrong between a command's options and its dataclass: fields without a flag, and
    options that are neither a field nor a declared extra."""
    options = {p.name: p for p in command.params if p.name != "help"}
    problems = [
        f"field {f.name} has no {flag_of(f.name)}"
        for f in dataclasses.fields(cls)
        if f.name not in options or flag_of(f.name) not in options[f.name].opts
    ]
    names = {f.name for f in dataclasses.fields(cls)}
    problems += [
        f"option {'/'.join(p.opts)} is neither a field of {cls.__name__} nor a declared extra"
        for name, p in options.items()
        if name not in names and name not in extras
    ]
    return problems


def test_every_field_has_a_flag_and_every_flag_a_field_or_a_declared_extra():
    found = commands(app)
    for path, (cls, extras) in COMMANDS.items():
        assert coverage_problems(found[path], cls, extras) == [], path


def test_every_command_built_from_a_config_is_in_the_coverage_table():
    bound = {
        path: command.callback.__fedsplit_binding__
        for path, command in commands(app).items()
        if hasattr(command.callback, "__fedsplit_binding__")
    }
    assert set(bound) == set(COMMANDS)
    for path, binding in bound.items():
        assert binding.cls is COMMANDS[path][0] and set(binding.extras) == COMMANDS[path][1], path


def test_the_coverage_check_catches_a_missing_flag_and_an_undeclared_option():
    @dataclasses.dataclass
    class Small:
        steps: int = dataclasses.field(default=1, metadata={"help": "steps"})
        seed: int = dataclasses.field(default=0, metadata={"help": "seed"})

    broken = typer.Typer()

    @broken.command()
    def handwritten(steps: int = typer.Option(1), verbose: bool = typer.Option(False)) -> None:
        """A command that forgot --seed and grew --verbose."""

    @broken.command()
    @config_options(Small)
    def generated(cfg: Small, stray: Optional[str] = typer.Option(None)) -> None:
        """A command built from the fields, with one extra the table does not declare."""

    found = commands(broken)
    assert coverage_problems(found["handwritten"], Small, set()) == [
        "field seed has no --seed",
        "option --verbose is neither a field of Small nor a declared extra",
    ]
    assert coverage_problems(found["generated"], Small, set()) == [
        "option --stray is neither a field of Small nor a declared extra"
    ]
    assert coverage_problems(found["generated"], Small, {"stray"}) == []


def test_help_and_defaults_come_from_the_fields():
    found = commands(app)
    for path, (cls, _) in COMMANDS.items():
        binding = found[path].callback.__fedsplit_binding__
        options = {p.name: p for p in found[path].params}
        for f in dataclasses.fields(cls):
            option = options[f.name]
            assert option.help == f.metadata["help"], (path, f.name)
            default = binding.defaults.get(f.name, field_default(f))
            if "parse" in f.metadata and default is not None:
                assert f.metadata["parse"](option.default) == default, (path, f.name)
            else:
                assert option.default == default, (path, f.name)


def test_false_bools_are_plain_flags_and_the_token_reads_its_environment_variable():
    found = commands(app)
    train = {p.name: p for p in found["train"].params}
    for name in ("resume", "noise_relative", "centralized"):
        assert train[name].is_flag and train[name].opts == [flag_of(name)] and not train[name].secondary_opts
    assert train["token"].envvar == "FEDSPLIT_TOKEN"
    assert {p.name: p.opts for p in found["eval"].params}["split"] == ["--split"]
    assert {p.name: p.opts for p in found["attack"].params}["attack"] == ["--attack"]


def test_the_server_default_message_limit_is_the_wire_default():
    from fedsplit.wire import codec

    assert ServerConfig().max_message_bytes == codec.DEFAULT_MAX_MESSAGE_BYTES


@pytest.mark.parametrize(
    "text, size", [("4GiB", 4 << 30), ("512MiB", 512 << 20), ("1048576", 1 << 20), ("1.5GB", 1_500_000_000)]
)
def test_sizes_read_binary_and_decimal_units_and_plain_bytes(text, size):
    assert parse_size(text) == size


def test_a_size_shown_as_a_default_reads_back_as_itself():
    for size in (4 << 30, 256 << 20, 3 << 10, 1000, 0):
        assert parse_size(format_size(size)) == size
    assert format_size(4 << 30) == "4GiB"


def run_cli(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        app(list(args), prog_name="fedsplit")
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["serve", "--layers", "zero:30"], "error: --layers takes A:B (e.g. 0:30), not 'zero:30'"),
        (["serve", "--memory-budget", "lots"], "error: --memory-budget takes a size such as 4GiB"),
        (["serve", "--max-message-bytes", "many"], "error: --max-message-bytes takes a size"),
        (["serve", "--max-message-bytes", "2GiB"], "error: --max-message-bytes takes a size from 1 byte"),
        (["simulate", "--head-layers", "1,x"], "error: --head-layers takes an integer or a comma-separated"),
        (["bench", "train-modes", "--rtt-ms", "0;20"], "error: --rtt-ms takes comma-separated numbers"),
        (["bench", "load", "--memory-budget", "big"], "error: --memory-budget takes a size"),
    ],
)
def test_text_an_option_cannot_parse_is_a_one_line_error_naming_the_option(capsys, args, message):
    code, err = run_cli(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(message), err


@pytest.fixture
def served(monkeypatch):
    """`fedsplit serve` up to the point where it would load the model: the ServerConfig it built."""
    import fedsplit.server.runner as runner

    seen = {}

    def build_servicer(config, tokens):
        seen["config"] = config
        return None

    async def serve_forever(*args):
        return None

    monkeypatch.setattr(runner, "build_servicer", build_servicer)
    monkeypatch.setattr(runner, "serve_forever", serve_forever)
    return seen


def test_serve_builds_its_config_from_parsed_options(capsys, served):
    code, err = run_cli(
        capsys, "serve", "--layers", "2:10", "--memory-budget", "512MiB", "--max-message-bytes", "64MiB"
    )
    assert code == 0, err
    config = served["config"]
    assert (config.layers, config.memory_budget, config.max_message_bytes) == ((2, 10), 512 << 20, 64 << 20)
    assert config.graph_ttl == 300.0 and config.session_ttl == 600.0


def test_serve_reads_a_config_file_with_sizes_as_text_and_the_command_line_wins(tmp_path, capsys, served):
    path = tmp_path / "serve.toml"
    path.write_text('[serve]\nport = 9001\nmemory_budget = "2GiB"\nlayers = "0:4"\nmode = "sequential"\n')
    code, err = run_cli(capsys, "serve", "--config", str(path), "--port", "0")
    assert code == 0, err
    config = served["config"]
    assert (config.port, config.memory_budget, config.layers, config.mode) == (
        0,
        2 << 30,
        (0, 4),
        "sequential",
    )


def test_a_bad_size_in_a_config_file_is_a_one_line_error_naming_the_key(tmp_path, capsys, served):
    path = tmp_path / "serve.yaml"
    path.write_text("memory_budget: plenty\n")
    code, err = run_cli(capsys, "serve", "--config", str(path))
    assert code == 2 and "'memory_budget' takes a size" in err and "serve.yaml" in err, err


def test_train_takes_clip_norm_on_the_command_line(tmp_path, monkeypatch, capsys):
    import fedsplit.client.train as train_module

    seen = {}

    def fake_training(cfg):
        seen["cfg"] = cfg
        return {"after": {}, "train_seconds": 0.0}

    monkeypatch.setattr(train_module, "run_training", fake_training)
    code, err = run_cli(capsys, "train", "--local", "--clip-norm", "0.5", "--noise-relative")
    assert code == 0, err
    assert (seen["cfg"].clip_norm, seen["cfg"].noise_relative, seen["cfg"].out) == (0.5, True, "runs/latest")


# Every command that loads a segment (all but export and token) places it: --device and --dtype.
PLACED = set(COMMANDS)


def test_every_command_that_loads_a_segment_takes_device_and_dtype():
    found = commands(app)
    for path in PLACED:
        flags = {opt for p in found[path].params for opt in p.opts}
        assert {"--device", "--dtype"} <= flags, path
        assert {p.name: p.default for p in found[path].params}["device"] == "auto", path


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--local", "--prompt", "x"],
        ["train", "--local"],
        ["eval"],
        ["attack"],
        ["simulate"],
        ["demo"],
        ["bench", "generate"],
        ["bench", "memory"],
        ["bench", "train-modes"],
    ],
)
def test_cuda_without_a_gpu_is_a_one_line_error_naming_the_option(capsys, monkeypatch, args):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = run_cli(capsys, *args, "--model", "no-such-model-xyz", "--device", "cuda")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: --device 'cuda' asks for CUDA but torch sees no GPU here"), err


def test_an_unknown_dtype_is_a_one_line_error_naming_the_option(capsys):
    code, err = run_cli(capsys, "generate", "--local", "--prompt", "x", "--dtype", "fp8")
    assert code == 2 and err.strip() == "error: --dtype 'fp8' is not known; use one of auto, fp32, bf16, fp16"


def test_generate_passes_device_and_dtype_to_the_model(capsys, monkeypatch):
    from fedsplit.client.api import SplitModelForCausalLM

    seen = {}

    def from_pretrained(*args, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(SplitModelForCausalLM, "from_pretrained", from_pretrained)
    code, err = run_cli(capsys, "generate", "--local", "--prompt", "x", "--dtype", "bf16", "--device", "cpu")
    assert code == 2 and "stop here" in err
    assert (seen["device"], seen["dtype"]) == ("cpu", "bf16")
