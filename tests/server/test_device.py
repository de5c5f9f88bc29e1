"""The server on any device and dtype: a bf16 body serves fp32 clients over any wire dtype, admission
counts the body's element size, checkpoints move between dtypes (and devices), and CPU/fp32 stays as it was.

Tests marked ``gpu`` need CUDA and are skipped without it (``scripts/gpu_check.sh`` runs them).
"""

import asyncio
import copy
import logging
import threading

import grpc
import pytest
import torch
from federation_helpers import open_train, ragged, run

from fedsplit.cli.main import app
from fedsplit.client.core import LocalTransport, SplitClient
from fedsplit.client.remote import RemoteError, RemoteTransport
from fedsplit.model.lora import LoraSettings, add_lora
from fedsplit.model.split import load_part
from fedsplit.server.adapters import AdapterPool
from fedsplit.server.batching import run_batch
from fedsplit.server.config import CPU_MEMORY_BUDGET, ServerConfig
from fedsplit.server.opening import memory_needed
from fedsplit.server.placement import resolve_memory_budget
from fedsplit.server.runner import build_servicer, start_background
from fedsplit.server.service import SplitServicer
from fedsplit.server.session import BodySession
from fedsplit.wire import codec
from fedsplit.wire.protocol import SessionConfig

SPEC = "tiny-llama"
LORA = LoraSettings(rank=4, alpha=8.0)
# Relative error a bf16 body may add to the gradients and loss an fp32 client sees. Measured on the
# CPU against an fp32 body: loss 4e-5, head LoRA grads 0.6 % (int8 wire 1.4 %), body LoRA grads 1.3 %
# (int8 wire 1.9 %); bf16 keeps 8 bits of mantissa (2^-8 = 0.4 % per rounding) and the backward
# rounds a few times. A gradient that misses a segment, a scale or a row is off by O(1).
BF16_GRAD_RTOL = 5e-2
BF16_LOSS_RTOL = 1e-3
# Largest logit error of a bf16 body under an fp32 head and tail, relative to the largest logit.
# Measured on the CPU: 2^-8 (fp32 or fp16 wire), 0.7 % (int8 wire); an fp32 body over an fp32 wire
# gives exactly the unsplit logits. A wrong mask or position moves logits by a good part of their scale.
BF16_LOGIT_RTOL = 2**-5

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def serve(**options):
    config = ServerConfig(model=SPEC, port=0, shutdown_grace=0.2, **options)
    return start_background(build_servicer(config))


def batch():
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(10, 250, (2, 9), generator=gen)
    pad = torch.tensor([0, 4])
    labels = ids.masked_fill(torch.arange(9)[None] <= pad[:, None], -100)
    return {"input_ids": ids, "labels": labels, "pad_lengths": pad}


def client_pair(address, fingerprint, wire_dtype):
    """An fp32 CPU client of the server at ``address`` and its twin on an in-process fp32 CPU body."""
    head, tail = load_part(SPEC, "head", 1, 1), load_part(SPEC, "tail", 1, 1)
    add_lora(head, LORA, seed=5)
    add_lora(tail, LORA, seed=5)
    transport = RemoteTransport(address, wire_dtype=wire_dtype, fingerprint=fingerprint, retries=0)
    remote = SplitClient(head, tail, transport, (1, 3))
    local = SplitClient(
        copy.deepcopy(head), copy.deepcopy(tail), LocalTransport(load_part(SPEC, "body", 1, 1)), (1, 3)
    )
    return remote, local


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return (
        (got.float().cpu() - want.float().cpu()).norm() / want.float().cpu().norm().clamp_min(1e-12)
    ).item()


def adapter_grads(body, adapter: str) -> dict[str, torch.Tensor]:
    """The adapter's gradients keyed by layer-global name (bodies holding other spans line up)."""
    suffix = f".{adapter}.weight"
    return {
        name[name.index("layers.") :].removesuffix(suffix): p.grad
        for name, p in body.named_parameters()
        if name.endswith(suffix) and p.grad is not None
    }


def train_and_compare(srv, fingerprint, wire_dtype):
    """One train step of an fp32 client on ``srv`` and on an fp32 in-process body: worst relative errors."""
    remote, local = client_pair(srv.address, fingerprint, wire_dtype)
    config = SessionConfig(span=(1, 3), mode="train", lora=LORA, max_batch=2, max_length=64, seed=3)
    remote.start_training(config)
    local.start_training(config)
    loss_r, _ = remote.loss_and_backward(batch())
    loss_l, _ = local.loss_and_backward(batch())
    assert torch.isfinite(loss_r)
    head = [
        relative(p_r.grad, p_l.grad)
        for p_r, p_l in zip(remote.head.parameters(), local.head.parameters())
        if p_r.requires_grad
    ]
    served = next(s for s in srv.servicer.sessions.values() if s.config.mode == "train")
    got = adapter_grads(srv.servicer.body, served.adapter)
    want = adapter_grads(local.transport.body, local.train_session.adapter)
    assert got and set(got) == set(want)
    assert all(torch.isfinite(g).all() and g.dtype == torch.float32 for g in got.values())
    body = [relative(got[k], want[k]) for k in want]
    return remote, abs(loss_r.item() - loss_l.item()) / abs(loss_l.item()), max(head), max(body)


# ----------------------------------------------------------------------------- configuration


def test_the_default_server_here_runs_on_the_cpu_in_fp32_with_a_4gib_budget(no_cuda):
    servicer = build_servicer(ServerConfig(model=SPEC, port=0))
    try:
        assert (servicer.device, servicer.dtype) == (torch.device("cpu"), torch.float32)
        assert {(p.device.type, p.dtype) for p in servicer.body.parameters()} == {("cpu", torch.float32)}
        assert servicer.memory_budget == CPU_MEMORY_BUDGET == 4 << 30
    finally:
        servicer.executor.shutdown()


def test_a_bf16_server_keeps_its_weights_in_bf16_and_its_adapters_in_fp32():
    servicer = build_servicer(ServerConfig(model=SPEC, port=0, device="cpu", dtype="bf16"))
    try:
        assert servicer.dtype == torch.bfloat16
        assert {p.dtype for p in servicer.body.parameters()} == {torch.bfloat16}
        session = BodySession(
            servicer.body, servicer.pool, SessionConfig(span=(1, 3), mode="train", lora=LORA)
        )
        assert {p.dtype for p in servicer.pool.parameters(session.adapter)} == {torch.float32}
    finally:
        servicer.executor.shutdown()


def test_the_server_logs_its_device_dtype_and_budget_at_start(caplog):
    with caplog.at_level(logging.INFO, logger="fedsplit.server.runner"):
        with serve(device="cpu", dtype="bf16"):
            pass
        with serve(device="cpu", memory_budget=256 << 20):
            pass
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("body on")]
    assert lines == [
        "body on cpu in bfloat16; sessions may reserve 4096.0 MiB (the CPU default)",
        "body on cpu in float32; sessions may reserve 256.0 MiB (--memory-budget)",
    ]


def test_the_budget_is_the_users_else_90_percent_of_free_gpu_memory_else_4gib(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 << 30, 80 << 30))
    assert resolve_memory_budget(None, torch.device("cuda:0")) == int(0.9 * (10 << 30))
    assert resolve_memory_budget(512 << 20, torch.device("cuda:0")) == 512 << 20
    assert resolve_memory_budget(None, torch.device("cpu")) == 4 << 30
    assert resolve_memory_budget(1000, torch.device("cpu")) == 1000


def run_cli(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        app(list(args), prog_name="fedsplit")
    return exc.value.code, capsys.readouterr().err


def test_serve_takes_device_dtype_and_an_auto_memory_budget(capsys, monkeypatch):
    import fedsplit.server.runner as runner

    seen = []

    async def serve_forever(*args):
        return None

    monkeypatch.setattr(runner, "build_servicer", lambda config, tokens: seen.append(config))
    monkeypatch.setattr(runner, "serve_forever", serve_forever)
    assert run_cli(capsys, "serve", "--device", "cpu", "--dtype", "bf16", "--memory-budget", "auto")[0] == 0
    assert run_cli(capsys, "serve")[0] == 0
    assert run_cli(capsys, "serve", "--memory-budget", "1GiB")[0] == 0
    assert [(c.device, c.dtype, c.memory_budget) for c in seen] == [
        ("cpu", "bf16", None),
        ("auto", "auto", None),
        ("auto", "auto", 1 << 30),
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device", "tpu"], "error: device 'tpu' is not known; use one of auto, cpu, cuda"),
        (["--device", "cpu", "--dtype", "int8"], "error: dtype 'int8' is not known; use one of auto, fp32"),
    ],
)
def test_an_unknown_device_or_dtype_stops_serve_with_one_line(capsys, no_cuda, args, message):
    code, err = run_cli(capsys, "serve", "--model", SPEC, "--port", "0", *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(message), err


# ----------------------------------------------------------------------------- the wire


@pytest.mark.parametrize("wire, tol", [("fp32", 0.0), ("bf16", 0.0), ("fp16", 1e-3), ("int8", 2e-2)])
def test_bf16_states_travel_in_any_wire_dtype_and_land_in_the_body_dtype(wire, tol):
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    msg = codec.encode_tensor(x, wire)
    as_bf16 = codec.decode_tensor(msg, out_dtype=torch.bfloat16, device="cpu")
    as_fp32 = codec.decode_tensor(msg)
    assert as_bf16.dtype == torch.bfloat16 and as_fp32.dtype == torch.float32
    assert (as_fp32 - x.float()).abs().max().item() <= tol * x.float().abs().max().item()
    assert torch.equal(as_bf16, as_fp32.to(torch.bfloat16))


# ----------------------------------------------------------------------------- admission


def test_admission_counts_caches_and_graphs_in_the_body_dtype_and_adapters_in_fp32():
    body = load_part(SPEC, "body", span=(0, 4))
    cfg = body.config
    generate = SessionConfig(span=(1, 3), mode="generate", max_length=128, max_batch=2)
    assert memory_needed(body, generate, torch.bfloat16) * 2 == memory_needed(body, generate, torch.float32)
    assert memory_needed(body, generate) == memory_needed(body, generate, torch.float32)  # the body's own
    train = SessionConfig(span=(1, 3), mode="train", lora=LORA, max_length=64, max_batch=2)
    fp32, bf16 = memory_needed(body, train, torch.float32), memory_needed(body, train, torch.bfloat16)
    # activations halve; the fp32 adapter (weight, grad and two AdamW moments, A and B, ~4 targets) does not
    adapter = 2 * 4 * LORA.rank * 2 * cfg.hidden_size * 4 * 4
    assert 2 * bf16 - fp32 == adapter > 0


def test_a_bf16_server_admits_a_cache_that_an_fp32_server_refuses_under_the_same_budget(fingerprint):
    body = load_part(SPEC, "body", span=(0, 4), dtype="bf16")
    ask = SessionConfig(span=(1, 3), mode="generate", max_length=512, max_batch=2)
    budget = memory_needed(body, ask)  # exactly what the bf16 cache takes: half of the fp32 one
    for dtype, admitted in (("bf16", True), ("fp32", False)):
        with serve(device="cpu", dtype=dtype, memory_budget=budget) as srv:
            assert srv.servicer.memory_budget == budget
            transport = RemoteTransport(srv.address, fingerprint=fingerprint, retries=0)
            if admitted:
                transport.open(ask).close()
            else:
                with pytest.raises(RemoteError) as exc:
                    transport.open(ask)
                assert exc.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


# ----------------------------------------------------------------------------- a bf16 server, fp32 clients


@pytest.fixture(scope="module")
def bf16_server():
    srv = serve(device="cpu", dtype="bf16")
    yield srv
    srv.stop()


@pytest.mark.parametrize("wire", ["fp16", "int8"])
def test_a_bf16_server_trains_an_fp32_client_close_to_an_fp32_body(bf16_server, fingerprint, wire):
    remote, loss_err, head_err, body_err = train_and_compare(bf16_server, fingerprint, wire)
    assert loss_err <= BF16_LOSS_RTOL
    assert head_err <= BF16_GRAD_RTOL and body_err <= BF16_GRAD_RTOL
    served = next(s for s in bf16_server.servicer.sessions.values() if s.config.mode == "train")
    before = {k: v.clone() for k, v in bf16_server.servicer.pool.state_dict(served.adapter).items()}
    remote.optimizer_step()
    after = bf16_server.servicer.pool.state_dict(served.adapter)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # fp32 adapters take small steps
    assert all(torch.isfinite(v).all() for v in after.values())
    remote.train_session.close()


@pytest.mark.parametrize("wire", ["fp16", "int8"])
def test_a_bf16_server_generates_for_an_fp32_client(bf16_server, fingerprint, wire, tiny):
    remote, _ = client_pair(bf16_server.address, fingerprint, wire)
    b = batch()
    tokens = remote.generate(b["input_ids"], b["pad_lengths"], max_new_tokens=8)
    assert tokens.shape == (2, 8) and tokens.dtype == torch.long
    assert bool(((tokens >= 0) & (tokens < remote.tail.config.vocab_size)).all())
    logits = remote.logits(b["input_ids"], b["pad_lengths"])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    model, _ = tiny
    mask = (torch.arange(9)[None] >= b["pad_lengths"][:, None]).long()
    with torch.no_grad():
        want = model(
            b["input_ids"], attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
        ).logits
    real = mask.bool()
    assert (logits[real] - want[real]).abs().max().item() <= BF16_LOGIT_RTOL * want[real].abs().max().item()


def test_an_in_process_bf16_body_takes_and_returns_tensors_in_the_callers_dtype():
    body = load_part(SPEC, "body", span=(0, 4), dtype="bf16")
    session = BodySession(
        body, AdapterPool(body), SessionConfig(span=(1, 3), mode="train", lora=LORA, seed=3)
    )
    hidden = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    out = session.forward(1, hidden, torch.tensor([0, 2]))
    assert out.dtype == torch.float32 and session.graphs[1].outputs.dtype == torch.bfloat16
    grad_in = session.backward(1, torch.ones_like(out))
    assert grad_in.dtype == torch.float32 and grad_in.shape == hidden.shape and torch.isfinite(grad_in).all()
    grads = adapter_grads(body, session.adapter)
    assert sorted({int(k.split(".")[1]) for k in grads}) == [1, 2]  # the span's layers, and only they
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    session.step()


# ----------------------------------------------------------------------------- batching on a bf16 body


def test_decode_steps_on_a_bf16_body_batch_like_solo_steps():
    body = load_part(SPEC, "body", span=(0, 4), dtype="bf16")
    pool = AdapterPool(body)
    zero = torch.zeros(1, dtype=torch.long)

    def prefilled(length, seed):
        session = BodySession(
            body, pool, SessionConfig(span=(1, 3), mode="generate", max_length=64, max_batch=2)
        )
        gen = torch.Generator().manual_seed(seed)
        session.forward(0, torch.randn(1, length, 64, generator=gen).to(torch.bfloat16), zero, 0)
        return session

    steps = [
        torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(s)).to(torch.bfloat16) for s in (1, 2)
    ]
    alone = [prefilled(n, seed) for n, seed in ((3, 10), (7, 11))]
    expected = [s.forward(1, x, zero, s.cache.length) for s, x in zip(alone, steps)]
    together = [prefilled(n, seed) for n, seed in ((3, 10), (7, 11))]
    got = run_batch([(s, x, zero, s.cache.length) for s, x in zip(together, steps)])
    for e, g in zip(expected, got):
        assert g.dtype == torch.bfloat16
        assert (e.float() - g.float()).abs().max().item() <= 2**-6 * e.float().abs().max().item()
    assert [s.cache.length for s in together] == [4, 8]
    assert all(k.dtype == torch.bfloat16 for s in together for k, _ in s.cache.layers.values())


# ----------------------------------------------------------------------------- replica rows on a bf16 body


def test_a_server_hierarchical_pass_on_a_bf16_body_trains_each_replica_as_if_alone():
    def servicer(mode):
        body = load_part(SPEC, "body", span=(0, 4), dtype="bf16")
        return SplitServicer(body, ServerConfig(model=SPEC, mode=mode, round_timeout=10), "test")

    # what the service decodes from the wire: bf16 states on the body's device
    clients = [(h.to(torch.bfloat16), p) for h, p in (ragged(2, 5, 1), ragged(2, 9, 2))]
    gen = torch.Generator().manual_seed(9)
    grads = [torch.randn(h.shape, generator=gen).to(torch.bfloat16) for h, _ in clients]
    joint = servicer("server-hierarchical")
    sessions = [open_train(joint, seed=seed, owner=f"c{i}") for i, seed in enumerate((3, 4))]
    coord = joint.coordinator

    async def step():
        gate = threading.Event()
        joint.executor.submit(gate.wait, 10)  # the worker is busy: both forwards queue into one pass
        tasks = [asyncio.create_task(coord.forward(s, 1, h, p, 0)) for s, (h, p) in zip(sessions, clients)]
        await asyncio.sleep(0.2)
        gate.set()
        outs = await asyncio.gather(*tasks)
        grad_ins = await asyncio.gather(*(coord.backward(s, 1, g) for s, g in zip(sessions, grads)))
        return outs, grad_ins

    try:
        outs, grad_ins = run(step())
        assert coord.passes == 1
        for i, ((hidden, pad), seed) in enumerate(zip(clients, (3, 4))):
            alone = servicer("independent")
            try:
                solo = open_train(alone, seed=seed, owner="solo")
                want_out = solo.forward(1, hidden, pad, 0)
                want_grad_in = solo.backward(1, grads[i])
                real = torch.arange(hidden.shape[1])[None] >= pad[:, None]
                assert outs[i].dtype == grad_ins[i].dtype == torch.bfloat16
                assert relative(outs[i][real], want_out[real]) <= 2**-6
                assert relative(grad_ins[i][real], want_grad_in[real]) <= BF16_GRAD_RTOL
                # each replica gets the gradient of its own rows, in fp32 (AdamW's first step is
                # sign(grad) * lr, so weights after it are compared through the gradients instead)
                got = adapter_grads(joint.body, sessions[i].adapter)
                want = adapter_grads(alone.body, solo.adapter)
                assert got and set(got) == set(want)
                for key in want:
                    assert got[key].dtype == torch.float32
                    assert relative(got[key], want[key]) <= BF16_GRAD_RTOL, key
            finally:
                alone.executor.shutdown()

        async def steps():
            await asyncio.gather(*(coord.step(s, 0.0) for s in sessions))

        run(steps())
        assert all(
            torch.isfinite(v).all() for s in sessions for v in joint.pool.state_dict(s.adapter).values()
        )
    finally:
        joint.executor.shutdown()


# ----------------------------------------------------------------------------- checkpoints across dtypes


def open_run(srv, fingerprint):
    transport = RemoteTransport(srv.address, wire_dtype="fp32", fingerprint=fingerprint, retries=0)
    config = SessionConfig(
        span=(1, 3), mode="train", lora=LORA, seed=7, lr=1e-2, max_length=8, max_batch=1, run_id="r"
    )
    return transport.open(config)


def train(session, steps, first=1):
    for step in range(first, first + steps):
        hidden = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(step))
        out = session.forward(step, hidden, torch.zeros(1, dtype=torch.long))
        session.backward(step, out.detach().clone())
        session.step()


def run_state(servicer):
    """The run's adapter weights and AdamW tensors as the server holds them (on its device)."""
    session = next(s for s in servicer.sessions.values() if s.run_id == "r")
    adapter = servicer.pool.state_dict(session.adapter)
    params = session.optimizer.param_groups[0]["params"]
    moments = [session.optimizer.state[p] for p in params]
    return session, adapter, params, moments


def resume_across(tmp_path, fingerprint, first: dict, then: dict):
    """Train a run 2 steps on a server with ``first`` options, restart with ``then``, resume it."""
    options = dict(checkpoint_dir=str(tmp_path / "runs"), checkpoint_every=2)
    with serve(**options, **first) as srv:
        session = open_run(srv, fingerprint)
        train(session, 2)
        assert session.last_stats["checkpointed"] == 1.0
        _, adapter, _, moments = run_state(srv.servicer)
        saved = {k: v.cpu() for k, v in adapter.items()}
        saved_moments = [{k: v.cpu() for k, v in m.items() if torch.is_tensor(v)} for m in moments]
        session.close()
    with serve(**options, **then) as srv:
        session = open_run(srv, fingerprint)
        assert session.opened_step == 2 and session.resumed
        _, adapter, params, moments = run_state(srv.servicer)
        for key, value in saved.items():
            assert adapter[key].dtype == torch.float32 and torch.equal(adapter[key].cpu(), value), key
        assert sum(bool(m) for m in saved_moments) == 2 * 4 * 2  # the span's layers x 4 targets x (A, B)
        for param, state, want in zip(params, moments, saved_moments):
            assert set(want) <= set(state)
            for name in ("exp_avg", "exp_avg_sq") if want else ():
                assert state[name].device == param.device and state[name].dtype == param.dtype
                assert torch.equal(state[name].cpu(), want[name])
        train(session, 1, first=3)
        assert session.last_stats["step"] == 3.0
        _, adapter, _, _ = run_state(srv.servicer)
        assert all(torch.isfinite(v).all() for v in adapter.values())
        session.close()


@pytest.mark.parametrize("first, then", [("bf16", "fp32"), ("fp32", "bf16")])
def test_a_run_checkpointed_in_one_dtype_resumes_in_another(tmp_path, fingerprint, first, then):
    resume_across(tmp_path, fingerprint, {"device": "cpu", "dtype": first}, {"device": "cpu", "dtype": then})


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@needs_cuda
def test_a_run_checkpointed_on_cuda_resumes_on_the_cpu(tmp_path, fingerprint):
    resume_across(
        tmp_path, fingerprint, {"device": "cuda", "dtype": "bf16"}, {"device": "cpu", "dtype": "fp32"}
    )


@pytest.mark.gpu
@needs_cuda
def test_a_cuda_server_budgets_from_free_gpu_memory_and_keeps_state_on_the_gpu():
    servicer = build_servicer(ServerConfig(model=SPEC, port=0, device="cuda"))
    try:
        assert servicer.device.type == "cuda" and servicer.dtype == torch.bfloat16  # auto on cuda
        _free, total = torch.cuda.mem_get_info(servicer.device)
        assert 0 < servicer.memory_budget <= 0.9 * total
        session = BodySession(
            servicer.body,
            servicer.pool,
            SessionConfig(span=(1, 3), mode="generate", max_length=32, max_batch=2),
        )
        hidden = torch.randn(2, 5, 64)  # an in-process fp32 CPU caller
        out = session.forward(0, hidden, torch.tensor([0, 2]), 0)
        assert (out.device.type, out.dtype) == ("cpu", torch.float32)
        assert all(
            (k.device.type, k.dtype) == ("cuda", torch.bfloat16) for k, _ in session.cache.layers.values()
        )
        msg = codec.encode_tensor(session.body(hidden.to("cuda", torch.bfloat16)), "fp16")
        decoded = servicer.decode(msg)
        assert (decoded.device.type, decoded.dtype) == ("cuda", torch.bfloat16)
    finally:
        servicer.executor.shutdown()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("wire", ["fp32", "fp16"])
def test_a_train_step_with_the_body_on_cuda_bf16_is_close_to_an_fp32_cpu_body(fingerprint, wire):
    with serve(device="cuda", dtype="bf16") as srv:
        remote, loss_err, head_err, body_err = train_and_compare(srv, fingerprint, wire)
        served = next(s for s in srv.servicer.sessions.values() if s.config.mode == "train")
        assert {
            p.grad.device.type for p in srv.servicer.pool.parameters(served.adapter) if p.grad is not None
        } == {"cuda"}
        remote.optimizer_step()
        assert loss_err <= BF16_LOSS_RTOL
        assert head_err <= BF16_GRAD_RTOL and body_err <= BF16_GRAD_RTOL


@pytest.mark.gpu
@needs_cuda
def test_generation_with_an_fp32_body_on_cuda_gives_the_unsplit_models_greedy_tokens(fingerprint, tiny):
    # fp32 on cuda, not bf16: the check is exact token equality with the unsplit model, and only
    # fp32 keeps it robust (a bf16 body under an fp32 head and tail has no unsplit twin; the bf16
    # split = bf16 unsplit check lives in tests/model/test_dtype.py). Measured on the CPU: the
    # smallest gap between the top two logits over these 2 x 16 greedy steps is 1.0e-2 (logits up to
    # 0.6), while fp32 cuda and cpu differ by ~1e-6 (cuda matmuls run without TF32 by default).
    model, _ = tiny
    model.generation_config.eos_token_id = None
    b = batch()
    mask = (torch.arange(9)[None] >= b["pad_lengths"][:, None]).long()
    expected = model.generate(
        b["input_ids"], attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0
    )
    with serve(device="cuda", dtype="fp32") as srv:
        assert {p.device.type for p in srv.servicer.body.parameters()} == {"cuda"}
        remote, _ = client_pair(srv.address, fingerprint, "fp32")
        got = remote.generate(b["input_ids"], b["pad_lengths"], max_new_tokens=16)
    assert torch.equal(got, expected[:, 9:])


@pytest.mark.gpu
@needs_cuda
def test_generation_with_a_bf16_body_on_cuda_stays_close_to_fp32(fingerprint, tiny):
    model, _ = tiny
    b = batch()
    mask = (torch.arange(9)[None] >= b["pad_lengths"][:, None]).long()
    with torch.no_grad():
        want = model(
            b["input_ids"], attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
        ).logits
    with serve(device="cuda", dtype="bf16") as srv:
        remote, _ = client_pair(srv.address, fingerprint, "fp16")
        logits = remote.logits(b["input_ids"], b["pad_lengths"])
        tokens = remote.generate(b["input_ids"], b["pad_lengths"], max_new_tokens=16)
    real = mask.bool()
    assert (logits[real] - want[real]).abs().max().item() <= BF16_LOGIT_RTOL * want[real].abs().max().item()
    assert tokens.shape == (2, 16) and bool(((tokens >= 0) & (tokens < model.config.vocab_size)).all())
