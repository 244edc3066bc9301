"""`ar2dlm bench-train` bad input: one error line and exit 2, before any model loads."""

import pytest
import torch

from ar2dlm.recipes.bench_train import TrainBenchConfig
from ar2dlm.cli import main
from ar2dlm.errors import Ar2dlmError


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(Ar2dlmError, match="--device"):  # torch.device('tpu') used to be a RuntimeError traceback
        TrainBenchConfig(device="tpu")
    with pytest.raises(Ar2dlmError, match="--json-out"):
        TrainBenchConfig(json_out=str(tmp_path))
    with pytest.raises(Ar2dlmError, match="seq-len"):
        TrainBenchConfig(seq_len=4, block_size=4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    assert main(["bench-train", "--model", str(tmp_path / "no-model"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ar2dlm: error: --device cuda but no CUDA device is available"], err
