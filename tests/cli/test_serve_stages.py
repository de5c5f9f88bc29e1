"""`fedsplit serve --stages`: the options reach the ServerConfig; what cannot run ends in one line."""

import pytest

from fedsplit.cli.main import app


def run_cli(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        app(list(args), prog_name="fedsplit")
    return exc.value.code, capsys.readouterr().err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_stage_options_reach_the_server_config(capsys, monkeypatch):
    import fedsplit.server.runner as runner

    seen = {}

    def build_servicer(config, tokens, **options):
        seen["config"], seen["options"] = config, options

    async def serve_forever(*args):
        pass

    monkeypatch.setattr(runner, "build_servicer", build_servicer)
    monkeypatch.setattr(runner, "serve_forever", serve_forever)
    app(
        ["serve", "--stages", "2", "--ray-address", "auto", "--stage-layers", "0:2,2:4", "--threads", "1"],
        prog_name="fedsplit",
        standalone_mode=False,
    )
    config = seen["config"]
    assert (config.stages, config.ray_address, config.stage_layers) == (2, "auto", ((0, 2), (2, 4)))
    assert seen["options"] == {"threads": 1}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stages", "2", "--mode", "sequential"], "--mode sequential does not run with --stages"),
        (["--ray-address", "auto"], "--ray-address runs the body's stages on Ray: give --stages 2 or more"),
        (["--stages", "9"], "--stages 9: the server holds 4 layers"),
        (["--stages", "2", "--stage-layers", "0:1,2:4"], "--stage-layers takes contiguous spans"),
        (["--stages", "2", "--stage-layers", "0:1,1:3"], "must cover the held layers 0:4"),
        (["--stages", "2", "--ray-address", "127.0.0.1:9"], "cannot reach the Ray cluster at 127.0.0.1:9"),
    ],
)
def test_what_cannot_run_ends_in_one_line(capsys, args, message):
    code, err = run_cli(capsys, "serve", "--model", "tiny-llama", "--port", "0", *args)
    assert code == 2
    assert message in one_line_error(err)


def test_missing_ray_ends_in_one_line(capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails
    code, err = run_cli(capsys, "serve", "--model", "tiny-llama", "--port", "0", "--stages", "2")
    assert code == 2 and "--stages needs Ray" in one_line_error(err)
