"""The likelihood primitives on tiny random models (seconds on a CPU); `ar2dlm ppl` is tested in recipes/test_ppl.py."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from ar2dlm.engine import Engine
from ar2dlm.errors import Ar2dlmError
from ar2dlm.evaluation.likelihood import ar_nll, diffusion_nll, draw_masks, greedy_match, make_batch, masked_ce, row_seed
from ar2dlm.model.dlm import BlockDiffusionLM
from ar2dlm.model.loading import load_base
from ar2dlm.testing import tiny_base, tiny_dlm_folders

DOCS = [
    "the quick brown fox jumps over the lazy dog",
    "Natalia sold 48 clips in April and half as many in May.\nHow many clips did she sell?",
    "def add(a, b):\n    return a + b\n",
    "0 1 2 3 4 5 6 7 8 9 10 + - * / = #### answer",
    "the lazy dog sleeps while the quick brown fox runs",
]
CHATS = [{"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]},
         {"question": "Add 3 and 5.", "answer": "3 + 5 = 8\n#### 8"}]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl")
    base = tiny_base(root)
    dlms = tiny_dlm_folders(root, base)
    text = root / "heldout.txt"
    text.write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in CHATS), encoding="utf-8")
    return {"root": root, "base": base, **dlms, "text": text, "chat": chat}


@pytest.fixture(scope="module")
def models(files):
    dlm1, tok = BlockDiffusionLM.from_pretrained(files["dlm1"])
    dlm4, _ = BlockDiffusionLM.from_pretrained(files["dlm4"])
    parent, _ = load_base(str(files["base"]))
    model, base_tok = load_base(str(files["base"]))
    noshift = BlockDiffusionLM.from_base(model, base_tok, block_size=4, token_shift=False)
    return {"dlm1": dlm1.eval(), "dlm4": dlm4.eval(), "dlm4_noshift": noshift.eval(), "parent": parent.eval(),
            "tok": tok}


def _rows(tok, texts=DOCS):
    rows = []
    for t in texts:
        ids = tok(t)["input_ids"]
        rows.append((ids, [True] * len(ids)))
    return rows


def _batch(models, dlm="dlm4", texts=DOCS):
    d, tok = models[dlm], models["tok"]
    return make_batch(_rows(tok, texts), d.config.block_size, d.config.mask_token_id, tok.pad_token_id)


# ------------------------------------------------------------------------------------------------ exactness
def test_block_size_1_bound_at_t_1_is_the_ar_nll(models):
    # A 1-token block fully masked, predicted (token shift) from the clean copy of everything before it, is exactly
    # the AR parent's prediction; at block size 1 every draw masks the one token, so any t gives the same number.
    batch = _batch(models, "dlm1")
    ar = ar_nll(models["parent"], batch)
    seeds = [row_seed((0, i)) for i in range(len(DOCS))]
    fixed = diffusion_nll(models["dlm1"], batch, 1, seeds, fixed_t=1.0)[0]
    sampled = diffusion_nll(models["dlm1"], batch, 3, seeds)
    assert torch.allclose(fixed, ar, rtol=1e-5) and torch.allclose(sampled, ar.expand(3, -1), rtol=1e-5)
    assert ar.min() > 0


@pytest.mark.parametrize("which", ["dlm4", "dlm4_noshift"])
def test_monte_carlo_estimate_matches_exact_enumeration(models, which):
    # Exact bound of a block with n scored tokens: sum over non-empty subsets M of (1/|M|) / C(n,|M|) * CE(M).
    # Block terms are independent (a noisy block sees itself and clean earlier blocks), so one forward per 4-bit
    # pattern, applied to every block at once, enumerates all subsets of all blocks.
    dlm, batch = models[which], _batch(models, which, DOCS[:3])
    bsz = dlm.config.block_size
    n_rows, width = batch.scored.shape
    offset = torch.arange(width) % bsz
    exact = torch.zeros(n_rows, dtype=torch.float64)
    for bits in itertools.product([False, True], repeat=bsz):
        if not any(bits):
            continue
        pattern = torch.tensor(bits)[offset]
        ce = masked_ce(dlm, batch, batch.scored & pattern).double()
        for b in range(-(-width // bsz)):
            sl = slice(b * bsz, (b + 1) * bsz)
            sc, pat = batch.scored[:, sl], pattern[sl]
            n = sc.sum(1)
            inside = ~(pat & ~sc).any(1)  # the pattern chooses only scored positions of this block: M = pattern
            k = int(pat.sum())
            w = torch.where(inside & (n >= k), 1.0 / (k * torch.tensor([math.comb(int(x), k) for x in n])), 0.0)
            exact += w * ce[:, sl].sum(1)
    seeds = [row_seed((7, i)) for i in range(n_rows)]
    draws = diffusion_nll(dlm, batch, 64, seeds)
    est, se = draws.mean(0), draws.std(0) / 8
    assert ((est - exact).abs() <= 4 * se + 1e-6).all(), (est, exact, se)
    assert ((est - exact).abs() / exact).max() < 0.02


# ------------------------------------------------------------------------------------------------ sampling
def test_draw_masks_are_stratified_nonempty_and_weighted():
    scored = torch.tensor([[False, True, True, True, True, True, False, False, True, True]])
    masks, weights = draw_masks(scored, 4, 12, [row_seed((0, 0))])
    assert masks.shape == weights.shape == (12, 1, 10)
    assert not (masks & ~scored).any()  # never an unscored position
    for lo, n in ((0, 3), (4, 2), (8, 2)):  # blocks and their scored counts
        k = masks[:, 0, lo:lo + 4].sum(-1)
        # stratified: 12 draws split evenly over k = 1..n (n divides 12), so never an empty mask
        assert torch.equal(torch.bincount(k, minlength=n + 1), torch.tensor([0] + [12 // n] * n))
        w = weights[:, 0, lo:lo + 4]
        assert torch.allclose(w.sum(-1), torch.full((12,), float(n), dtype=torch.float64))  # k positions, n / k each
    t1, w1 = draw_masks(scored, 4, 2, [5], fixed_t=1.0)
    assert torch.equal(t1[0, 0], scored[0]) and torch.equal(w1, t1.double())
    with pytest.raises(Ar2dlmError, match="fixed t"):
        draw_masks(scored, 4, 1, [5], fixed_t=0.0)


def test_estimate_is_seeded_and_its_spread_shrinks_with_more_samples(models):
    dlm, batch = models["dlm4"], _batch(models)
    n_rows = batch.ids.shape[0]

    def estimate(seed, samples):
        return float(diffusion_nll(dlm, batch, samples, [row_seed((seed, i)) for i in range(n_rows)]).mean(0).sum())

    assert estimate(3, 4) == estimate(3, 4) and estimate(3, 4) != estimate(4, 4)
    one = torch.tensor([estimate(s, 1) for s in range(12)])
    many = torch.tensor([estimate(s, 16) for s in range(12)])
    assert many.var() < one.var() / 8  # at least the 1/16 of independent draws, up to the noise of 12 seeds
    assert abs(float(many.mean() - one.mean())) < 4 * float(one.std()) / math.sqrt(12)


# ------------------------------------------------------------------------------------------------ greedy check
def test_greedy_match_agrees_with_the_engines_ar_decoding(models):
    dlm, tok = models["dlm4"], models["tok"]
    ctx = tok("the quick brown fox")["input_ids"]
    gen = Engine(dlm, tok).generate(ctx, max_new_tokens=10, policy="ar", stop_token_ids=()).tokens
    assert len(gen) == 10
    rows, wrong = [], []
    for m in range(1, 11):
        cont = gen[:m]
        rows.append((ctx + cont, [False] * len(ctx) + [True] * m))
        bad = cont[:-1] + [(cont[-1] + 1) % 290]
        wrong.append((ctx + bad, [False] * len(ctx) + [True] * m))
    c = dlm.config
    assert greedy_match(dlm, make_batch(rows, 4, c.mask_token_id, tok.pad_token_id)).all()
    assert not greedy_match(dlm, make_batch(wrong, 4, c.mask_token_id, tok.pad_token_id)).any()
