"""Resumable training checkpoints: trainable weights, optimizer, RNG and data position, written atomically.

A checkpoint is one folder (`<output>/checkpoint`) replaced as a whole, so a run killed at any moment leaves either
the previous complete checkpoint or the new one. It is an internal artefact for `--resume`; the product of a run is
the Hugging Face checkpoint written at the end.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch
from torch import nn

from ar2dlm.errors import Ar2dlmError
from ar2dlm.utils.files import atomic_dir

STATE_FILE = "state.pt"


def _trainable_state(module: nn.Module, fsdp: bool) -> dict:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        names = {n for n, p in module.named_parameters() if p.requires_grad}
        return {k: v for k, v in full.items() if k in names}
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def _optimizer_state(module: nn.Module, optimizer, fsdp: bool) -> dict:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(module, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def save(folder: Path, *, module: nn.Module, optimizer, trainer_state: dict, fsdp: bool, is_main: bool) -> None:
    """Write the checkpoint (collective under FSDP: every rank must call it; only the main rank writes)."""
    model_state = _trainable_state(module, fsdp)
    optim_state = _optimizer_state(module, optimizer, fsdp)
    if not is_main:
        return
    state = {
        "model": model_state,
        "optimizer": optim_state,
        "trainer": trainer_state,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    with atomic_dir(folder) as tmp:
        torch.save(state, tmp / STATE_FILE)


def exists(folder: Path) -> bool:
    return (folder / STATE_FILE).is_file()


def remove(folder: Path) -> None:
    """Delete the checkpoint and what interrupted saves left beside it (`atomic_dir`'s `.checkpoint.*.tmp` and
    `.checkpoint.old`, as large as the checkpoint itself)."""
    folder = Path(folder)
    leftovers = [*folder.parent.glob(f".{folder.name}.*.tmp"), folder.with_name(f".{folder.name}.old")]
    for path in (folder, *leftovers):
        shutil.rmtree(path, ignore_errors=True)


def load(folder: Path, *, module: nn.Module, optimizer, fsdp: bool) -> dict:
    """Restore everything saved by `save` into live objects; returns the trainer state."""
    path = folder / STATE_FILE
    if not path.is_file():
        raise Ar2dlmError(f"nothing to resume: no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(module, state["model"], options=opts)
        set_optimizer_state_dict(module, optimizer, state["optimizer"], options=opts)
    else:
        missing = {n for n, p in module.named_parameters() if p.requires_grad} - set(state["model"])
        if missing:
            raise Ar2dlmError(f"checkpoint at {folder} does not match this model ({len(missing)} weights missing)")
        module.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["trainer"]
