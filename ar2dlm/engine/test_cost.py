"""The forward-cost curve on a tiny model: every width measured, through the engine's runner."""

from __future__ import annotations

from ar2dlm.engine.cost import forward_cost
from ar2dlm.model.dlm import BlockDiffusionLM
from ar2dlm.testing import tiny_model, tiny_tokenizer


def test_forward_cost_measures_every_width():
    tok = tiny_tokenizer()
    dlm = BlockDiffusionLM.from_base(tiny_model("llama", vocab_size=len(tok) + 1), tok, block_size=4).eval()
    calls = []
    embed = dlm.embed  # every forward, fused or Hugging Face's, embeds its fed ids once
    dlm.embed = lambda ids: calls.append(ids.shape[1]) or embed(ids)
    costs = forward_cost(dlm, widths=(1, 3, 8), context=20, repeats=2)
    assert list(costs) == [1, 3, 8] and all(c > 0 for c in costs.values())
    assert calls == [20] + [1] * 3 + [3] * 3 + [8] * 3  # the context once, then (warm-up + repeats) per width
