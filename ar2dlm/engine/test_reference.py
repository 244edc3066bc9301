"""The no-cache reference decoder, on tiny random models (compare is tested in recipes/test_compare.py)."""

from __future__ import annotations

import pytest
import torch

from ar2dlm.engine.reference import reference_generate
from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.dlm import BlockDiffusionLM
from ar2dlm.testing import tiny_model, tiny_tokenizer


def _pair(block_size: int, token_shift: bool = True, seed: int = 0):
    tok = tiny_tokenizer()
    model = tiny_model("llama", seed=seed, vocab_size=len(tok))
    ar = tiny_model("llama", seed=seed, vocab_size=len(tok))
    return ar, BlockDiffusionLM.from_base(model, tok, block_size=block_size, token_shift=token_shift).eval(), tok


@pytest.mark.parametrize("prompt", ["the quick brown fox", "0 1 2 3 4 5 6"])
def test_block_size_one_reproduces_greedy_ar(prompt):
    ar, dlm, tok = _pair(block_size=1)
    ids = tok(prompt)["input_ids"]
    expected = ar.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    for policy in ("ar", "threshold"):
        res = reference_generate(dlm, ids, 12, policy=policy)
        assert res.tokens == expected
        assert res.nfe == 12 and res.tpf == 1.0


def test_threshold_zero_decodes_a_block_per_forward_and_one_commits_each_step():
    _, dlm, tok = _pair(block_size=4)
    ids = tok("the quick brown fox")["input_ids"]  # block-aligned or not, the first block may be partial
    greedy = reference_generate(dlm, ids, 16, threshold=0.0)
    assert len(greedy.tokens) == 16
    first_block = 4 - len(ids) % 4
    assert greedy.nfe == 1 + (16 - first_block + 3) // 4  # every forward fills the whole (remaining) block
    strict = reference_generate(dlm, ids, 16, threshold=1.0)  # nothing is ever > 1: exactly one token a forward
    assert strict.nfe == 16
    ar = reference_generate(dlm, ids, 16, policy="ar")
    assert ar.nfe == 16


def test_stop_token_ends_generation():
    _, dlm, tok = _pair(block_size=4)
    ids = tok("the quick brown fox")["input_ids"]
    free = reference_generate(dlm, ids, 12, threshold=0.0)
    stop = free.tokens[5]
    res = reference_generate(dlm, ids, 12, threshold=0.0, stop_ids=(stop,))
    assert res.tokens[-1] == stop and stop not in res.tokens[:-1]


def test_bad_parameters():
    _, dlm, tok = _pair(block_size=4)
    with pytest.raises(Ar2dlmError):
        reference_generate(dlm, [1, 2], 4, threshold=1.5)
    with pytest.raises(Ar2dlmError):
        reference_generate(dlm, [1, 2], 4, policy="nope")
    with pytest.raises(Ar2dlmError):
        reference_generate(dlm, [], 4)

