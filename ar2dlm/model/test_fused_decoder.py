"""The fused decoder forward equals Hugging Face's on the engine's KV pool: every supported family, a gated drafter
(mask rows contiguous or not, several rows), both linear kernels; packed weights follow in-place updates; models
that do not fit are refused with a reason."""

from __future__ import annotations

import pytest
import torch

from ar2dlm.drafter.gated import GatedDrafterLM
from ar2dlm.drafter.test_gated import randomize_adapter
from ar2dlm.engine.runner import ModelRunner
from ar2dlm.model.dlm import BlockDiffusionLM
from ar2dlm.model.fused_decoder import fused_decoder_for, unfusable_reason
from ar2dlm.model.packed_linear import onednn_available
from ar2dlm.testing import tiny_model, tiny_tokenizer

KERNELS = ["default"] + (["onednn"] if onednn_available() else [])


def _dlm(family="llama", drafter=False, **overrides):
    tok = tiny_tokenizer()
    base = tiny_model(family, vocab_size=len(tok) + 1, **overrides)
    if drafter:
        dlm = GatedDrafterLM.from_base(base, tok, block_size=4, base_model="tiny", rank=8, alpha=16)
        randomize_adapter(dlm)
    else:
        dlm = BlockDiffusionLM.from_base(base, tok, block_size=4)
    return dlm.eval()


def _two_forwards(runner: ModelRunner, ids: torch.Tensor, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal prefill of ids[:, :split], then the rest on top of it with bidirectional attention among the new
    positions (a block-diffusion style forward); the hidden states of both."""
    rows, total = ids.shape
    cache = runner.new_cache(rows)
    cache.reserve(total)
    for _ in range(rows):
        cache.allocate()
    out = []
    for lo, hi in ((0, split), (split, total)):
        slots = torch.arange(lo, hi).expand(rows, -1)
        key = torch.arange(hi)
        mask = (key[None, :] <= torch.arange(lo, hi)[:, None]) if lo == 0 else torch.ones(hi - lo, hi, dtype=bool)
        cache.bind(0, slots, hi)
        out.append(runner.decoder_hidden(ids[:, lo:hi], mask.expand(rows, 1, -1, -1), slots, cache))
    return out[0], out[1]


def _assert_same_as_hf(dlm, ids, split, kernel):
    fused, hf = ModelRunner(dlm, kernel), ModelRunner(dlm, kernel, fused=False)
    assert fused.fused is not None and hf.fused is None
    for a, b in zip(_two_forwards(fused, ids, split), _two_forwards(hf, ids, split)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_fused_forward_equals_hugging_face(family, kernel):
    dlm = _dlm(family, **({"attention_bias": True} if family == "llama" else {}))
    ids = torch.randint(0, 290, (2, 13), generator=torch.Generator().manual_seed(0))
    _assert_same_as_hf(dlm, ids, 9, kernel)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mask_slots", [[9, 10, 11, 12], [5, 9, 11]], ids=["contiguous", "scattered"])
def test_drafter_gate_reaches_only_mask_rows(mask_slots, kernel):
    """A gated drafter: the LoRA delta on the mask rows (a slice or an index), none elsewhere, as the Hugging Face
    forward with the drafter's gate computes it; in a batch the second row holds no mask token."""
    dlm = _dlm(drafter=True)
    ids = torch.randint(0, 290, (2, 13), generator=torch.Generator().manual_seed(1))
    ids[0, mask_slots] = dlm.config.mask_token_id
    _assert_same_as_hf(dlm, ids, 4, kernel)
    _assert_same_as_hf(dlm, ids[:1], 4, kernel)


def test_packed_weights_follow_in_place_updates():
    dlm = _dlm(drafter=True)
    ids = torch.randint(0, 290, (1, 10), generator=torch.Generator().manual_seed(2))
    ids[0, 7:] = dlm.config.mask_token_id
    runner = ModelRunner(dlm, KERNELS[-1])
    before = _two_forwards(runner, ids, 6)[1]
    with torch.no_grad():
        dlm.backbone.get_decoder().layers[0].mlp.down_proj.base.weight.mul_(1.5)
        randomize_adapter(dlm, seed=3)
    after = _two_forwards(runner, ids, 6)[1]
    assert not torch.allclose(before, after)
    _assert_same_as_hf(dlm, ids, 6, KERNELS[-1])


def test_one_fused_decoder_per_model_kernel_and_dtype():
    dlm = _dlm()
    first = fused_decoder_for(dlm, "default")
    assert fused_decoder_for(dlm, "default") is first
    assert fused_decoder_for(dlm, "onednn") is not first
    dlm.double()  # a cast model gets its own (the cached LoRA stacks and packed weights are per dtype)
    assert fused_decoder_for(dlm, "default") is not first


def test_models_that_do_not_fit_run_hugging_face():
    assert unfusable_reason(_dlm("mistral", sliding_window=8)) == "sliding-window attention"
    assert unfusable_reason(_dlm(hidden_act="gelu")) == "activation 'gelu'"
    lora = _dlm()
    lora.apply_lora(rank=4)
    assert "not plain" in unfusable_reason(lora)
    assert ModelRunner(lora).fused is None
    assert unfusable_reason(_dlm("qwen2")) is None
