"""Real server processes on free loopback ports, for the demo and benchmarks."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from ..client.remote import RemoteError, RemoteTransport, ServerUnreachable


def _parent_death_signal():
    """A ``preexec_fn`` by which the kernel sends the child SIGTERM when its parent dies (Linux).

    So a server started for a run does not outlive a parent that was killed outright. The
    signal fires when the *thread* that started the child ends, so only the main thread
    (which lives as long as the process) asks for it; elsewhere this returns None and the
    parent's own exit path still stops the child. ``prctl`` is looked up here, before the
    fork: the child only calls it.
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def placement_args(device: str = "auto", dtype: str = "auto") -> list[str]:
    """``fedsplit serve`` options that put the server's body on ``device`` in ``dtype``.

    "auto" is left out: the server resolves it on its own machine as the client does on
    this one, so the command line stays what it was for the default.
    """
    args = []
    if device != "auto":
        args += ["--device", device]
    if dtype != "auto":
        args += ["--dtype", dtype]
    return args


def placement_figures(device, dtype) -> dict:
    """``{"device": "cpu" | "cuda:0" ..., "dtype": "fp32" | "bf16" | "fp16"}`` for a bench's figures."""
    import torch

    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return {"device": str(device), "dtype": names.get(dtype, str(dtype))}


@contextlib.contextmanager
def server_process(
    model: str,
    *args: str,
    host: str = "127.0.0.1",
    timeout: float = 300.0,
    log_file=None,
    port: int | None = None,
):
    """``fedsplit serve`` in a child process; yields its address; SIGTERM on exit.

    ``port`` reuses a known port (a restarted server); default: a free one.
    """
    port = port or free_port(host)
    cmd = [
        sys.executable,
        "-m",
        "fedsplit.cli.main",
        "serve",
        "--model",
        model,
        "--host",
        host,
        "--port",
        str(port),
        *args,
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=log_file or subprocess.DEVNULL,
        stderr=log_file or subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=_parent_death_signal(),
    )
    address = f"{host}:{port}"
    try:
        probe = RemoteTransport(address, retries=0)
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode}: {' '.join(cmd)}")
            try:
                probe.info()
                break
            except RemoteError:  # it answers (e.g. UNAUTHENTICATED): it is up
                break
            except ServerUnreachable:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"server at {address} did not come up in {timeout:.0f}s") from None
                time.sleep(0.5)
        probe.close()
        yield address, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
