"""Where a model runs and in which precision: one place that turns user words into torch objects."""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a device.

    Raises:
        ValueError: an unknown name, or CUDA asked for where there is none (or not that many GPUs).
    """
    if isinstance(name, torch.device):
        name = str(name)
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        index = text.partition(":")[2]
        if index and not index.isdigit():
            raise ValueError(f"device {name!r} is not valid; use one of {', '.join(DEVICES)}")
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asks for CUDA but torch sees no GPU here; use 'cpu' or 'auto'")
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s), "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
        return torch.device(text)
    raise ValueError(f"device {name!r} is not known; use one of {', '.join(DEVICES)}")


def resolve_dtype(name: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """``"auto"`` (bf16 on CUDA, fp32 on CPU), ``"fp32"``, ``"bf16"`` or ``"fp16"`` as a torch dtype.

    Raises:
        ValueError: an unknown name.
    """
    if isinstance(name, torch.dtype):
        if not name.is_floating_point:
            raise ValueError(f"dtype {name} is not a floating-point type; use fp32, bf16 or fp16")
        return name
    text = str(name).strip().lower()
    if text == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if text not in DTYPES:
        raise ValueError(f"dtype {name!r} is not known; use one of auto, fp32, bf16, fp16")
    return DTYPES[text]
