"""Where the body runs and what its memory costs: its device and dtype, and the admission budget.

The server learns both from the body it holds (``fedsplit serve --device/--dtype`` chose them
when it loaded the layers), so tests and the in-process transport, which hand over a body they
built themselves, get the same treatment as a served one.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import CPU_MEMORY_BUDGET

#: Share of the GPU's free memory (after the body is loaded) that sessions may reserve when
#: ``--memory-budget`` is not given; the rest absorbs allocator slack and stateless forwards.
CUDA_BUDGET_SHARE = 0.9


def body_placement(body: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and compute dtype of ``body``'s frozen weights.

    LoRA weights are skipped (they are fp32 on a bf16 body). A body without weights (an empty
    span) computes nothing: it reports its buffers' device (the rotary frequencies) and fp32.
    """
    for name, param in body.named_parameters():
        if "lora_" not in name and param.is_floating_point():
            return param.device, param.dtype
    for buffer in body.buffers():
        return buffer.device, torch.float32
    return torch.device("cpu"), torch.float32


def resolve_memory_budget(given: int | None, device: torch.device) -> int:
    """Bytes sessions may reserve: ``given`` if the user set one; else 90 % of the GPU's free memory
    on CUDA (call it after the body is loaded), and ``CPU_MEMORY_BUDGET`` (4 GiB) on the CPU."""
    if given is not None:
        return int(given)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * CUDA_BUDGET_SHARE)
    return CPU_MEMORY_BUDGET
