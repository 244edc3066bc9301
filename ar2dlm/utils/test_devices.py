import pytest
import torch

from ar2dlm.errors import Ar2dlmError
from ar2dlm.utils.devices import resolve_device


def test_resolve_device_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(Ar2dlmError, match="--device cuda:1 but no CUDA device"):
        resolve_device("cuda:1")
    with pytest.raises(Ar2dlmError, match="unknown device 'tpu'"):
        resolve_device("tpu")
