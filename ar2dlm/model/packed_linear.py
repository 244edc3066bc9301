"""Linear layers that run inference on a CPU through oneDNN with weights packed once, instead of MKL's sgemm.

A decoding forward multiplies a few rows (its width: 1 for AR decoding, 2-30 for drafts, blocks and verification)
by every weight matrix. MKL's sgemm runs such thin products far below memory speed: on a 2-core AMD EPYC VM, the
30 decoder layers of SmolLM2-135M take 40 ms at 1 row but 66 ms at 2 and 76 ms at 8, and its 49K-row LM head 10 ms
at 1 row but 24 ms at 2. oneDNN with the weight reordered once into its blocked layout streams them at close to
the one-row cost (36 ms at 2 rows, 46 at 8; the head 7-10 ms), which is what makes a wide forward cheap enough for
drafting to pay on a CPU. `ar2dlm bench-width --linear-kernel` measures both on the machine at hand.

`use_linear_kernel(model, "onednn")` switches every `nn.Linear` of a model in place by swapping its class to
`PackedLinear`: parameters, names and state dicts stay as they are, the packed copy is a plain attribute (one more
copy of the weights in memory), rebuilt when the weight changes (any in-place update bumps its version). The packed
path runs only where it computes the same function: float32 on a CPU with no gradient needed; anything else (a
training step, another dtype or device) falls back to `F.linear`. Results equal `F.linear`'s up to rounding (a
different summation order).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ar2dlm.errors import Ar2dlmError

KERNELS = ("auto", "onednn", "default")


@functools.cache
def onednn_available() -> bool:
    """Whether this torch build can run a packed oneDNN linear (tried once on a tiny product)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        weight = torch.ones(3, 2)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 2), torch.ops.mkldnn._reorder_linear_weight(weight),
                                                 None, "none", [], "")
        return bool(torch.equal(out, torch.full((2, 3), 2.0)))
    except (RuntimeError, AttributeError):
        return False


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked copy of a float32 [out, in] weight (what `packed_linear` multiplies by)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """`F.linear(x, weight, bias)` on the packed weight (float32 CPU tensors, no autograd)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.ops.mkldnn._linear_pointwise(rows, packed, None if bias is None else bias.detach(), "none", [], "")
    return out.reshape(*x.shape[:-1], out_features)


class PackedLinear(nn.Linear):
    """An `nn.Linear` whose CPU float32 inference runs on a oneDNN-packed copy of its weight. Only ever made by
    swapping the class of an existing `nn.Linear` (`use_linear_kernel`), so it has no constructor of its own."""

    _packed: torch.Tensor | None = None
    _packed_key: tuple | None = None

    def _usable(self, x: torch.Tensor) -> bool:
        w = self.weight
        return (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
                and w.device.type == "cpu" and x.shape[-1] == self.in_features and x.numel() > 0
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                                      or (self.bias is not None and self.bias.requires_grad))))

    def packed_weight(self) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version, tuple(w.shape))
        if self._packed_key != key:
            self._packed = pack_weight(w)
            self._packed_key = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._usable(x):
            return F.linear(x, self.weight, self.bias)
        return packed_linear(x, self.packed_weight(), self.bias, self.out_features)

    def drop_packed(self) -> None:
        self.__dict__.pop("_packed", None)
        self.__dict__.pop("_packed_key", None)


def resolve_kernel(kernel: str, model: nn.Module) -> str:
    """`auto` is oneDNN for a float32 model on a CPU where this torch has it, else the default kernel."""
    if kernel not in KERNELS:
        raise Ar2dlmError(f"linear kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel != "auto":
        return kernel
    param = next(model.parameters(), None)
    on_cpu_f32 = param is not None and param.device.type == "cpu" and param.dtype == torch.float32
    return "onednn" if on_cpu_f32 and onednn_available() else "default"


def use_linear_kernel(model: nn.Module, kernel: str = "auto") -> str:
    """Switch every linear layer of `model` to `kernel` (see the module docstring) in place; returns the kernel in
    use. Asking for oneDNN where this torch lacks it raises."""
    kernel = resolve_kernel(kernel, model)
    if kernel == "onednn" and not onednn_available():
        raise Ar2dlmError("this torch build has no oneDNN linear kernel (use the default one)")
    for module in model.modules():
        if kernel == "onednn" and type(module) is nn.Linear:
            module.__class__ = PackedLinear
        elif kernel == "default" and type(module) is PackedLinear:
            module.drop_packed()
            module.__class__ = nn.Linear
    return kernel
