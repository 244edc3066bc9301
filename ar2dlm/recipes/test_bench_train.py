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


def test_bad_methods_are_refused():
    with pytest.raises(Ar2dlmError, match="--methods"):
        TrainBenchConfig(methods="ar,medusa")
    with pytest.raises(Ar2dlmError, match="--methods"):
        TrainBenchConfig(methods=",")
    with pytest.raises(Ar2dlmError, match="--methods"):
        TrainBenchConfig(methods="features")  # timed with `feature`, not on its own
    assert TrainBenchConfig(methods="drafter, ar").method_list == ["drafter", "ar"]


def test_every_method_is_timed_on_a_tiny_model(tmp_path, capsys):
    from ar2dlm.recipes.bench_train import run
    from ar2dlm.testing import tiny_base

    out = tmp_path / "bench.json"
    cfg = TrainBenchConfig(model=str(tiny_base(tmp_path)), batch_size=2, seq_len=32, steps=2, warmup=1,
                           device="cpu", lora_rank=4, json_out=str(out), methods="ar,dlm,lora,drafter,feature",
                           draft_vocab=64)
    result = run(cfg)
    for name in ("ar", "dlm", "lora", "drafter", "feature", "features"):
        assert len(result[name]["steps"]) == 2 and result[name]["tokens_per_s"] > 0, name
        assert result["over_ar_step_time"][name] > 0
    assert result["dlm_over_ar_step_time"] == result["over_ar_step_time"]["dlm"]
    printed = capsys.readouterr().out
    assert "gated drafter" in printed and "dLM LoRA conversion" in printed and "feature drafter" in printed
    assert out.is_file()
