"""`fedsplit bench generate`: split generation over loopback gRPC vs the unsplit model, in one run.

Both sides compute on the same device in the same dtype (``--device``, ``--dtype``): the client's
head and tail and the unsplit model in this process, the body in a `fedsplit serve` child. An
unsplit copy that would not fit beside the split one (a 7B shape in bf16 on a small machine) is
skipped, and the figures say why; split tokens/s and bytes per token are still measured.
"""

from __future__ import annotations

import logging
import time

import psutil
import torch

from ..client.core import LocalTransport, SplitClient
from ..client.remote import RemoteTransport
from ..model.device import resolve_device, resolve_dtype
from ..model.loading import load_config, load_model, load_tokenizer, model_fingerprint
from ..model.split import body_span, load_client_parts, load_part, num_layers
from .config import GenerateBenchConfig
from .procs import placement_args, placement_figures, server_process

log = logging.getLogger(__name__)

PROMPT = "Write a short story about a robot who learns to paint. Describe the colours it discovers."
HEADROOM = 1.1  # loading needs a little more than the weights; never fill the last byte


def _long_prompt(tokenizer, length: int) -> torch.Tensor:
    words = "The history of the river valley is long and full of change. " * 200
    ids = tokenizer(words)["input_ids"][:length]
    return torch.tensor([ids])


def parameter_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of the whole model's weights in ``dtype``, counted on a weightless (meta) copy."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in skeleton.parameters()) * torch.finfo(dtype).bits // 8


def unsplit_room(need: int, device: torch.device) -> str | None:
    """None when an unsplit copy of ``need`` bytes fits beside what is loaded now; else why it does not.

    The unsplit model is read into RAM first (and moved to the GPU on CUDA), so both must have room.
    """
    gib = 2**30
    available = psutil.virtual_memory().available
    if available < need * HEADROOM:
        return (
            f"the unsplit model ({need / gib:.1f} GiB) does not fit beside the split one: "
            f"{available / gib:.1f} GiB of RAM available"
        )
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if free < need * HEADROOM:
            return (
                f"the unsplit model ({need / gib:.1f} GiB) does not fit beside the split one: "
                f"{free / gib:.1f} GiB free on {device}"
            )
    return None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run ahead of the clock: wait for them before reading it
        torch.cuda.synchronize(device)


def run(cfg: GenerateBenchConfig) -> dict:
    """Measure everything side by side; returns one flat dict of figures."""
    model, new_tokens, wire_dtype = cfg.model, cfg.new_tokens, cfg.wire_dtype
    head_layers, tail_layers = cfg.head_layers, cfg.tail_layers
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(model)
    ids = torch.tensor(
        [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": PROMPT}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
            )["input_ids"]
        ]
    )
    config = load_config(model)
    span = body_span(num_layers(config), head_layers, tail_layers)
    head, tail = load_client_parts(model, head_layers, tail_layers, dtype=dtype, device=device)
    hidden = int(config.hidden_size)
    figures: dict = {
        "model": model,
        "new_tokens": new_tokens,
        "head_layers": head_layers,
        "tail_layers": tail_layers,
        "wire_dtype": wire_dtype,
        "hidden_size": hidden,
        **placement_figures(device, dtype),
    }
    with server_process(model, *placement_args(cfg.device, cfg.dtype)) as (address, _):
        transport = RemoteTransport(address, wire_dtype=wire_dtype, fingerprint=model_fingerprint(model))
        client = SplitClient(head, tail, transport, span)
        need = parameter_bytes(config, dtype)
        figures["model_gib"] = need / 2**30
        skipped = unsplit_room(need, device)
        full = None
        if skipped is None:
            full, _ = load_model(model, dtype=dtype)
            full.to(device)
            full.generation_config.eos_token_id = None  # always generate exactly new_tokens
        else:
            log.warning("bench generate: %s; measuring the split model alone", skipped)
            figures["centralized_skipped"] = skipped
        with torch.no_grad():
            client.generate(ids, max_new_tokens=4)  # warm up both sides
            if full is not None:
                full.generate(ids.to(device), max_new_tokens=4, do_sample=False)

            def centralized():
                t = time.perf_counter()
                full.generate(
                    ids.to(device), max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens
                )
                _synchronize(device)
                return new_tokens / (time.perf_counter() - t)

            def split():
                transport.traffic.reset()
                t = time.perf_counter()
                out = client.generate(ids, max_new_tokens=new_tokens)  # back on the CPU: synchronised
                return out.shape[1] / (time.perf_counter() - t)

            # Interleave repetitions so machine noise hits both alike; report the medians.
            cen, spl = [], []
            for _ in range(3):
                if full is not None:
                    cen.append(centralized())
                spl.append(split())
            if full is not None:
                figures["centralized_tokens_per_s"] = sorted(cen)[1]
            figures["split_tokens_per_s"] = sorted(spl)[1]
            if full is not None:
                figures["ratio"] = figures["split_tokens_per_s"] / figures["centralized_tokens_per_s"]
                # The same split computation with the body in this process (no network, no second
                # process on the same cores): separates the split's own cost from the transport's.
                body = load_part(model, "body", span=span, dtype=dtype, device=device)
                local = SplitClient(head, tail, LocalTransport(body), span)
                local.generate(ids, max_new_tokens=4)
                rates = []
                for _ in range(3):
                    t = time.perf_counter()
                    out = local.generate(ids, max_new_tokens=new_tokens)
                    rates.append(out.shape[1] / (time.perf_counter() - t))
                figures["split_in_process_tokens_per_s"] = sorted(rates)[1]
                figures["in_process_ratio"] = sorted(rates)[1] / figures["centralized_tokens_per_s"]
                del full, body, local  # the cache comparison below runs the split model only

            # Bytes per decode step (the prefill is excluded): measure a 1-token run and a k-token run.
            def traffic_of(k):
                transport.traffic.reset()
                client.generate(ids, max_new_tokens=k)
                return transport.traffic.sent, transport.traffic.received

            s1, r1 = traffic_of(1)
            s2, r2 = traffic_of(17)
            figures["bytes_per_token_up"] = (s2 - s1) / 16
            figures["bytes_per_token_down"] = (r2 - r1) / 16
            element = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}[wire_dtype]
            figures["bytes_per_token_bound"] = 1.05 * hidden * element + 64

            # KV cache vs the naive protocol (recompute the whole prefix every token) at a long context.
            long_ids = _long_prompt(tokenizer, cfg.context)
            steps = cfg.no_cache_tokens
            stamps: list[float] = []
            cached_steps = 32  # cheap: time more of them
            client.generate(
                long_ids,
                max_new_tokens=cached_steps + 1,
                on_token=lambda _: stamps.append(time.perf_counter()),
            )
            # The first token comes after the prefill; the rest are cached decode steps at this context.
            cached_per_token = (stamps[-1] - stamps[0]) / cached_steps
            t = time.perf_counter()
            seq = long_ids
            for _ in range(steps):
                nxt = client.generate(seq, max_new_tokens=1)
                seq = torch.cat([seq, nxt], dim=1)
            no_cache_per_token = (time.perf_counter() - t) / steps
            figures["context_tokens"] = cfg.context
            figures["cached_tokens_per_s"] = 1 / cached_per_token
            figures["no_cache_tokens_per_s"] = 1 / no_cache_per_token
            figures["cache_speedup"] = no_cache_per_token / cached_per_token
        transport.close()
    return figures
