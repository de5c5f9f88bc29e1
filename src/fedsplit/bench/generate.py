"""`fedsplit bench generate`: split generation over loopback gRPC vs the unsplit model, in one run."""

from __future__ import annotations

import logging
import time

import torch

from ..client.core import SplitClient
from ..client.remote import RemoteTransport
from ..model.loading import load_model, load_tokenizer, model_fingerprint
from ..model.split import body_span, load_part, num_layers
from .config import GenerateBenchConfig
from .procs import server_process

log = logging.getLogger(__name__)

PROMPT = "Write a short story about a robot who learns to paint. Describe the colours it discovers."


def _long_prompt(tokenizer, length: int) -> torch.Tensor:
    words = "The history of the river valley is long and full of change. " * 200
    ids = tokenizer(words)["input_ids"][:length]
    return torch.tensor([ids])


def run(cfg: GenerateBenchConfig) -> dict:
    """Measure everything side by side; returns one flat dict of figures."""
    model, new_tokens, wire_dtype = cfg.model, cfg.new_tokens, cfg.wire_dtype
    head_layers, tail_layers = cfg.head_layers, cfg.tail_layers
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
    full, _ = load_model(model)
    full.generation_config.eos_token_id = None  # always generate exactly new_tokens
    n = num_layers(full.config)
    span = body_span(n, head_layers, tail_layers)
    head, tail = (
        load_part(model, "head", head_layers, tail_layers),
        load_part(model, "tail", head_layers, tail_layers),
    )
    hidden = int(full.config.hidden_size)
    figures: dict = {
        "model": model,
        "new_tokens": new_tokens,
        "head_layers": head_layers,
        "tail_layers": tail_layers,
        "wire_dtype": wire_dtype,
        "hidden_size": hidden,
    }
    with server_process(model) as (address, _):
        transport = RemoteTransport(address, wire_dtype=wire_dtype, fingerprint=model_fingerprint(model))
        client = SplitClient(head, tail, transport, span)
        with torch.no_grad():
            client.generate(ids, max_new_tokens=4)  # warm up both sides
            full.generate(ids, max_new_tokens=4, do_sample=False)

            def centralized():
                t = time.perf_counter()
                full.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
                return new_tokens / (time.perf_counter() - t)

            def split():
                transport.traffic.reset()
                t = time.perf_counter()
                out = client.generate(ids, max_new_tokens=new_tokens)
                return out.shape[1] / (time.perf_counter() - t)

            # Interleave repetitions so machine noise hits both alike; report the medians.
            cen, spl = [], []
            for _ in range(3):
                cen.append(centralized())
                spl.append(split())
            figures["centralized_tokens_per_s"] = sorted(cen)[1]
            figures["split_tokens_per_s"] = sorted(spl)[1]
            figures["ratio"] = figures["split_tokens_per_s"] / figures["centralized_tokens_per_s"]

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
