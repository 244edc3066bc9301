"""oneDNN packed linear layers: same function as nn.Linear, switched in place, falling back where they must."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.packed_linear import PackedLinear, onednn_available, resolve_kernel, use_linear_kernel

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN linear")


def _model(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 40, bias=bias), nn.GELU(), nn.Linear(40, 8, bias=False))


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_packed_layers_compute_what_nn_linear_does(bias):
    model = _model(bias)
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        want = model(x)
        assert use_linear_kernel(model, "onednn") == "onednn"
        assert all(type(m) is PackedLinear for m in (model[0], model[2]))
        for rows in (x[0, :1], x[0], x, x.transpose(0, 1)):  # 1 row, several, 3-D, non-contiguous
            ref = F.linear(F.gelu(F.linear(rows, model[0].weight, model[0].bias)), model[2].weight)
            assert torch.allclose(model(rows), ref, rtol=1e-5, atol=1e-6)
        assert torch.allclose(model(x), want, rtol=1e-5, atol=1e-6)
        assert model[0]._packed is not None  # the packed path ran (not the fallback)


@needs_onednn
def test_state_dict_and_switching_back_are_unchanged():
    model = _model()
    keys = list(model.state_dict())
    use_linear_kernel(model, "onednn")
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        model(torch.randn(2, 24))
    assert use_linear_kernel(model, "default") == "default"
    assert type(model[0]) is nn.Linear and not hasattr(model[0], "_packed")


@needs_onednn
def test_an_in_place_weight_update_repacks():
    model = _model()
    use_linear_kernel(model, "onednn")
    x = torch.randn(4, 24)
    with torch.no_grad():
        model(x)
        model[0].weight.mul_(-2.0)
        assert torch.allclose(model[0](x), F.linear(x, model[0].weight, model[0].bias), rtol=1e-5, atol=1e-6)


@needs_onednn
def test_gradients_and_other_dtypes_take_the_default_path():
    model = _model()
    use_linear_kernel(model, "onednn")
    x = torch.randn(4, 24, requires_grad=True)
    model(x).sum().backward()  # a training step: autograd through F.linear
    assert x.grad is not None and model[0].weight.grad is not None and model[0]._packed is None
    model.double()
    with torch.no_grad():
        out = model(torch.randn(2, 24, dtype=torch.float64))
    assert out.dtype == torch.float64 and model[0]._packed is None


def test_auto_picks_onednn_only_for_float32_on_cpu():
    assert resolve_kernel("auto", _model()) == ("onednn" if onednn_available() else "default")
    assert resolve_kernel("auto", _model().double()) == "default"
    assert resolve_kernel("default", _model()) == "default"
    with pytest.raises(Ar2dlmError, match="linear kernel"):
        resolve_kernel("fast", _model())
