"""`fedsplit serve` as a real process: serves the CLI client, stops cleanly on SIGTERM."""

import signal
import subprocess
import sys

import pytest

from fedsplit.bench.procs import server_process

pytestmark = pytest.mark.e2e


def test_serve_process_streams_generation_and_exits_cleanly_on_sigterm():
    with server_process("tiny-llama", "--memory-budget", "64MiB") as (address, proc):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedsplit.cli.main",
                "generate",
                "--server",
                address,
                "--model",
                "tiny-llama",
                "--head-layers",
                "1",
                "--tail-layers",
                "1",
                "--prompt",
                "hello",
                "--max-new-tokens",
                "4",
                "--stream",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
