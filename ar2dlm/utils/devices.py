"""Which torch device a command runs on: one resolver, so every command reads --device the same way."""

from __future__ import annotations

import torch

from ar2dlm.errors import Ar2dlmError


def resolve_device(spec: str | None) -> torch.device:
    """`None` or "auto": the GPU when there is one, else the CPU; otherwise a torch device name ("cpu", "cuda:1").
    Asking for CUDA without a GPU is one error line, not torch's assertion deep inside the first kernel."""
    if spec is None or spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise Ar2dlmError(f"unknown device {spec!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Ar2dlmError(f"--device {spec} but no CUDA device is available")
    return dev
