"""Crash-safe checkpoints: one directory per step, tensors in safetensors, everything else in JSON.

A checkpoint is written into a hidden temporary directory, every file is fsynced, then
the directory is renamed to ``step-<n>`` and its parent fsynced. A ``kill -9`` at any
moment leaves either the complete new checkpoint or none of it — never a half-written
one that a reader could pick up. ``state.json`` also records the SHA-256 of the tensor
file, so a checkpoint damaged later (a bad disk, a hand edit) is skipped, not loaded.

Used by both sides: the server for body LoRA + AdamW, the client for head/tail LoRA +
AdamW + data position. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

log = logging.getLogger(__name__)

TENSORS = "tensors.safetensors"
STATE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d{1,12})$")


class CheckpointError(Exception):
    """A checkpoint that cannot be read or does not fit what it is loaded into."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write one JSON file so that readers see the old or the new content, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    _write_synced(tmp, json.dumps(obj, indent=2, sort_keys=True).encode())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def write_checkpoint(root: str | Path, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Atomically write ``root/step-<step>`` holding ``tensors`` and ``meta`` (JSON-serialisable)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        blob = save_tensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        _write_synced(tmp / TENSORS, blob)
        state = {"step": step, "sha256": hashlib.sha256(blob).hexdigest(), "meta": meta}
        _write_synced(tmp / STATE, json.dumps(state, indent=2, sort_keys=True).encode())
        _fsync_dir(tmp)
        if final.exists():  # the same step written again after a resume: swap, then drop the old one
            old = root / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def checkpoint_steps(root: str | Path) -> list[int]:
    """Steps with a complete checkpoint under ``root``, ascending (temporary leftovers ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE).is_file() and (child / TENSORS).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def read_checkpoint(root: str | Path, step: int) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of ``root/step-<step>``; CheckpointError if missing or damaged."""
    directory = step_dir(root, step)
    try:
        state = json.loads((directory / STATE).read_text())
        blob = (directory / TENSORS).read_bytes()
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {directory}: {exc}") from None
    if hashlib.sha256(blob).hexdigest() != state.get("sha256") or state.get("step") != step:
        raise CheckpointError(f"checkpoint {directory} is damaged (checksum or step mismatch)")
    return load_tensors(blob), state.get("meta", {})


def valid_steps(root: str | Path) -> list[int]:
    """Like :func:`checkpoint_steps` but only checkpoints whose checksum verifies."""
    good = []
    for step in checkpoint_steps(root):
        try:
            read_checkpoint(root, step)
            good.append(step)
        except CheckpointError as exc:
            log.warning("%s; ignoring it", exc)
    return good


def prune(root: str | Path, keep: int, above: int | None = None) -> None:
    """Delete all but the newest ``keep`` checkpoints, and every one after step ``above``.

    Checkpoints after the step a run resumed from belong to an abandoned timeline; keeping
    them would make a later "latest" pick the wrong one. Also clears temporary leftovers of
    writes a crash interrupted.
    """
    root = Path(root)
    if not root.is_dir():
        return
    steps = checkpoint_steps(root)
    doomed = [s for s in steps if above is not None and s > above]
    alive = [s for s in steps if s not in doomed]
    if keep > 0 and len(alive) > keep:
        doomed += alive[:-keep]
    for step in doomed:
        shutil.rmtree(step_dir(root, step), ignore_errors=True)
    for child in root.iterdir():
        if child.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(child, ignore_errors=True)


# --------------------------------------------------------------------------- optimizer state


def optimizer_state(
    optimizer: torch.optim.Optimizer, names: list[str], prefix: str = "optim."
) -> tuple[dict, dict]:
    """An optimizer's state as (tensors keyed ``<prefix><param name>.<key>``, JSON-able meta).

    ``names`` names the optimizer's parameters in the order it holds them (one param group).
    """
    sd = optimizer.state_dict()
    if len(sd["param_groups"]) != 1 or len(sd["param_groups"][0]["params"]) != len(names):
        raise CheckpointError("optimizer layout does not match the parameter names")
    tensors, scalars = {}, {}
    for index, name in zip(sd["param_groups"][0]["params"], names):
        for key, value in sd["state"].get(index, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{name}.{key}"] = value.clone()
            else:
                scalars[f"{name}.{key}"] = value
    group = {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in sd["param_groups"][0].items() if k != "params"
    }
    return tensors, {"group": group, "scalars": scalars, "names": list(names)}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, names: list[str], tensors: dict, meta: dict, prefix: str = "optim."
) -> None:
    """Inverse of :func:`optimizer_state`."""
    if meta.get("names") != list(names):
        raise CheckpointError("the checkpoint's optimizer covers different parameters than this model")
    sd = optimizer.state_dict()
    group = dict(meta["group"])
    for key in ("betas",):
        if key in group and isinstance(group[key], list):
            group[key] = tuple(group[key])
    state: dict[int, dict] = {}
    for index, name in enumerate(names):
        entry = {
            k[len(f"{prefix}{name}.") :]: v for k, v in tensors.items() if k.startswith(f"{prefix}{name}.")
        }
        entry.update({k[len(name) + 1 :]: v for k, v in meta["scalars"].items() if k.startswith(f"{name}.")})
        if entry:
            state[index] = entry
    group["params"] = sd["param_groups"][0]["params"]
    optimizer.load_state_dict({"state": state, "param_groups": [group]})
