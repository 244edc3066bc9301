"""The forward-cost curve on a tiny model: every width measured, through the engine's runner."""

from __future__ import annotations

import pytest

from ar2dlm.engine.cost import forward_cost, shape_cost
from ar2dlm.model.dlm import BlockDiffusionLM
from ar2dlm.testing import tiny_model, tiny_tokenizer


@pytest.mark.parametrize("fused", [True, False])
def test_forward_cost_measures_every_width(fused):
    tok = tiny_tokenizer()
    dlm = BlockDiffusionLM.from_base(tiny_model("llama", vocab_size=len(tok) + 1), tok, block_size=4).eval()
    fed = []
    embed = dlm.embed  # every forward, fused or Hugging Face's, embeds its fed ids once
    dlm.embed = lambda ids: fed.append(ids[0].tolist()) or embed(ids)
    costs = shape_cost(dlm, [(1, 0), (3, 2), (8, 4)], context=20, repeats=2, fused=fused)
    assert list(costs) == [(1, 0), (3, 2), (8, 4)] and all(c > 0 for c in costs.values())
    # the context once, then (warm-up + repeats) per width
    assert [len(ids) for ids in fed] == [20] + [1] * 3 + [3] * 3 + [8] * 3
    mask = dlm.config.mask_token_id
    masked = [sum(t == mask for t in ids) for ids in fed]
    assert masked == [0] * 4 + [2] * 3 + [4] * 3
    assert all(ids[-n:] == [mask] * n for ids, n in zip(fed, masked) if n)  # the mask block closes the forward


def test_forward_cost_is_per_width_without_masks():
    tok = tiny_tokenizer()
    dlm = BlockDiffusionLM.from_base(tiny_model("llama", vocab_size=len(tok) + 1), tok, block_size=4).eval()
    costs = forward_cost(dlm, widths=(2, 5), context=8, repeats=1)
    assert list(costs) == [2, 5] and all(c > 0 for c in costs.values())


def test_shape_cost_runs_rows_side_by_side():
    tok = tiny_tokenizer()
    dlm = BlockDiffusionLM.from_base(tiny_model("llama", vocab_size=len(tok) + 1), tok, block_size=4).eval()
    fed = []
    embed = dlm.embed
    dlm.embed = lambda ids: fed.append(tuple(ids.shape)) or embed(ids)
    costs = shape_cost(dlm, [(3, 1)], context=10, repeats=1, rows=4)
    assert list(costs) == [(3, 1)] and costs[(3, 1)] > 0
    assert fed == [(4, 10), (4, 3), (4, 3)]  # the context of every row, then warm-up + repeat, all rows at once
