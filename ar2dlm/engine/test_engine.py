"""The cached decoding engine against the no-cache reference, HF generate, and its own contracts (tiny models)."""

from __future__ import annotations

import math

import pytest
import torch

from ar2dlm.engine import DecodeParams, Engine
from ar2dlm.engine.policies import (ArPolicy, EntropyPolicy, Proposal, StepsPolicy, ThresholdPolicy, make_policy,
                                      propose)
from ar2dlm.engine.reference import reference_generate
from ar2dlm.engine.sampling import Sampling
from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.dlm import BlockDiffusionLM, add_mask_token
from ar2dlm.testing import record_forwards, tiny_model, tiny_tokenizer

PROMPTS = ["the quick brown fox", "0 1 2 3 4 5 6", "def add(a, b):"]  # 12, 11 and 9 tokens


@pytest.fixture(scope="module")
def tok():
    """The tiny tokenizer with the mask token already added, so that every test (in any order, alone or not) builds
    its models with the same vocabulary size."""
    t = tiny_tokenizer()
    add_mask_token(tiny_model("llama", vocab_size=len(t)), t)
    return t


def _dlm(tok, block_size=4, token_shift=True, peaked=True, seed=0):
    """A tiny random dLM. `peaked` sharpens its output (final-norm gain x50) so that confidences spread over
    (0, 1) and thresholds between 0 and 1 commit some but not all positions of a block."""
    model = tiny_model("llama", seed=seed, vocab_size=len(tok))
    if peaked:
        with torch.no_grad():
            model.model.norm.weight.mul_(50.0)
    return BlockDiffusionLM.from_base(model, tok, block_size=block_size, token_shift=token_shift).eval()


# ----------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("block_size", [1, 3, 4])
@pytest.mark.parametrize("token_shift", [True, False])
def test_cached_engine_equals_reference(tok, block_size, token_shift):
    dlm = _dlm(tok, block_size, token_shift)
    engine = Engine(dlm, tok)
    nfes = set()
    for prompt in PROMPTS:  # lengths 12, 11, 9: block-aligned and not, for B = 3 and 4
        ids = tok(prompt)["input_ids"]
        for tau in (0.0, 0.4, 0.6, 0.8, 1.0):
            ref = reference_generate(dlm, ids, 14, threshold=tau)
            res = engine.generate(ids, max_new_tokens=14, tau=tau, stop_token_ids=())
            assert res.tokens == ref.tokens, (prompt, tau)
            assert res.nfe == ref.nfe, (prompt, tau)
            nfes.add(res.nfe)
    if block_size > 1:  # the taus really exercised partial commits, not only all-or-one
        assert len(nfes) >= 3


def test_engine_feeds_only_new_blocks_after_prefill(tok):
    """No re-encoding of the prefix: after the first forward each one feeds at most [finished block | open block]."""
    dlm = _dlm(tok, block_size=4)
    engine = Engine(dlm, tok)
    calls = record_forwards(engine.runner)
    ids = tok(PROMPTS[0])["input_ids"]  # 12 tokens: 3 full prompt blocks, then blocks at 12, 16, ...
    res = engine.generate(ids, max_new_tokens=16, tau=0.6, stop_token_ids=())
    fed = [queries for _, queries, _ in calls]
    assert len(fed) == res.nfe
    assert fed[0] == 16  # prefill of the prompt blocks + the first block's first step, in one forward
    assert max(fed[1:]) <= 8 and min(fed[1:]) == 4


def _record_forwards(engine):
    """Per forward, (rows, fed queries, attention key slots); per LM-head call, its rows."""
    fed, heads = record_forwards(engine.runner), []
    engine.dlm.backbone.get_output_embeddings().register_forward_hook(
        lambda mod, args, out: heads.append(args[0].shape[0]))
    return fed, heads


def test_ar_model_feeds_one_token_per_forward(tok):
    """Block size 1 with token shift (an AR model in the engine): after the prompt, each forward feeds only the token
    the previous one committed, attends over the filled slots only, and runs the LM head on one position."""
    dlm = BlockDiffusionLM.from_base(tiny_model("llama", seed=0, vocab_size=len(tok)), tok, block_size=1).eval()
    ids = tok(PROMPTS[0])["input_ids"]
    engine = Engine(dlm, tok)
    fed, heads = _record_forwards(engine)
    res = engine.generate(ids, max_new_tokens=10, policy="ar", stop_token_ids=())
    assert res.nfe == len(fed) == 10
    assert fed == [(1, len(ids), len(ids))] + [(1, 1, len(ids) + t) for t in range(1, 10)]
    assert heads == [1] * 10


def test_ar_policy_on_a_block_dlm_skips_the_open_block(tok):
    """The ar policy commits only the leftmost masked position: while that is a block start (predicted by the clean
    logit) the open block is not fed; tokens and NFE stay the reference decoder's."""
    dlm = _dlm(tok, block_size=4)
    engine = Engine(dlm, tok)
    fed, heads = _record_forwards(engine)
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        ref = reference_generate(dlm, ids, 13, policy="ar")
        fed.clear()
        heads.clear()
        res = engine.generate(ids, max_new_tokens=13, policy="ar", stop_token_ids=())
        assert (res.tokens, res.nfe) == (ref.tokens, ref.nfe), prompt
        assert len(fed) == res.nfe and heads == [1] * res.nfe
        if len(ids) % 4 == 0:
            assert fed[0][1] == len(ids)  # the prompt's blocks only: the first token comes from the clean logit
        assert max(q for _, q, _ in fed[1:]) <= 4  # never [finished block | open block]


def test_forward_with_nothing_to_feed():
    """A step whose only masked position is a block start with a stored clean logit, after the finished block has
    been cached, feeds nothing (no model call) but still counts as a forward, as in the reference decoder."""
    from ar2dlm.engine.blocks import BlockState

    vocab, policy = 8, ThresholdPolicy(0.5)
    peaked = torch.full((vocab,), -10.0)
    peaked[3] = 10.0
    flat = torch.zeros(vocab)
    row = BlockState([1, 2, 3, 4], 8, block_size=4, mask_id=7, token_shift=True, params=DecodeParams())
    p = row.plan()
    assert (p.fed_start, p.fed_end, p.final_end, p.logit_pos) == (0, 8, 4, [3, 4, 5, 6])
    row.apply(p, torch.stack([flat, peaked, peaked, peaked]), policy, Sampling(), None)  # 5, 6, 7; not 4
    assert row.pending[4:8] == [True, False, False, False] and row.cached == 4
    p = row.plan()
    assert p.fed == 0 and p.logit_pos == []
    old, new = row.apply(p, None, policy, Sampling(), None)  # 4 from the stored clean logit
    assert row.nfe == 2 and not row.pending[4] and (old, new) == (4, 8)
    p = row.plan()
    assert (p.fed_start, p.fed_end, p.logit_pos) == (4, 12, [7, 8, 9, 10])


def test_padding_queries_never_touch_cached_slots(tok):
    """In a batch, a row with nothing to feed (all its slots cached) is all dummy queries: they must not write into
    its cached slots, however short the other rows' fed ranges are."""
    from ar2dlm.engine.blocks import BlockState, Plan

    dlm = _dlm(tok, block_size=4)
    runner = Engine(dlm, tok).runner
    rows = [BlockState(list(range(3, 15)), 8, 4, dlm.config.mask_token_id, True, DecodeParams()),
            BlockState([5, 6, 7], 8, 4, dlm.config.mask_token_id, True, DecodeParams())]
    cache = runner.new_cache(2)
    cache.reserve(21)
    cache.allocate(), cache.allocate()
    runner.forward(cache, 0, list(zip(rows, [Plan(0, 12, 12, [11]), Plan(0, 4, 0, [2, 3])])))
    rows[0].cached = 12
    before = [layer.keys[0, :, :12].clone() for layer in cache.layers]
    logits = runner.forward(cache, 0, list(zip(rows, [Plan(12, 12, 12, []), Plan(0, 4, 0, [2, 3])])))
    assert logits[0] is None and logits[1].shape[0] == 2
    assert all(torch.equal(layer.keys[0, :, :12], b) for layer, b in zip(cache.layers, before))


def test_cache_pool_hands_attention_the_leading_slots_only():
    from ar2dlm.engine.kv_cache import KVCachePool

    cache = KVCachePool(num_layers=1, max_rows=2, length=10)
    assert cache.length == 64  # rounded up
    cache.allocate()
    k = torch.randn(1, 2, 2, 4)
    cache.bind(0, torch.tensor([[3, 4]]), kv_len=5)
    keys, values = cache.layers[0].update(k, k + 1)
    assert keys.shape == (1, 2, 5, 4) and torch.equal(keys[:, :, 3:5], k) and torch.equal(values[:, :, 3:5], k + 1)
    assert keys.data_ptr() == cache.layers[0].keys.data_ptr()  # a view of the buffer, not a copy
    with pytest.raises(ValueError):
        cache.bind(0, torch.tensor([[3]]), kv_len=65)
    with pytest.raises(ValueError):  # row 1 is not allocated
        cache.bind(1, torch.tensor([[3]]), kv_len=5)


def test_ar_policy_reproduces_hf_generate(tok):
    ar = tiny_model("llama", seed=0, vocab_size=len(tok))
    dlm = BlockDiffusionLM.from_base(tiny_model("llama", seed=0, vocab_size=len(tok)), tok, block_size=1).eval()
    engine = Engine(dlm, tok)
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        expected = ar.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=16, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
        res = engine.generate(ids, max_new_tokens=16, policy="ar", stop_token_ids=())
        assert res.tokens == expected
        assert res.nfe == 16 and res.tpf == 1.0


# ----------------------------------------------------------------------------------------------- policies
def _prop(conf, ent=None):
    conf = torch.tensor(conf)
    ent = torch.tensor(ent) if ent is not None else torch.zeros_like(conf)
    return Proposal(torch.arange(len(conf)) + 10, conf, ent)


def test_policy_selection_on_hand_made_numbers():
    p = _prop([0.2, 0.95, 0.5, 0.97], ent=[2.0, 0.1, 0.4, 1.5])
    assert ThresholdPolicy(0.9).select(p, True).tolist() == [False, True, False, True]
    assert ThresholdPolicy(0.99).select(p, True).tolist() == [False, False, False, True]  # at least the best
    assert ThresholdPolicy(0.99).select(p, False).tolist() == [False] * 4  # pre-decoding block may wait
    assert EntropyPolicy(0.5).select(p, True).tolist() == [False, True, True, False]
    assert EntropyPolicy(0.05).select(p, True).tolist() == [False, True, False, False]  # at least the lowest
    assert StepsPolicy(2).select(p, True).tolist() == [False, True, False, True]
    assert StepsPolicy(9).select(p, True).tolist() == [True] * 4
    assert StepsPolicy(1).select(_prop([0.5, 0.5, 0.1]), True).tolist() == [True, False, False]  # ties: leftmost
    assert ArPolicy().select(p, True).tolist() == [True, False, False, False]


def test_propose_greedy_and_sampled():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]]))
    g = propose(logits)
    assert g.tokens.tolist() == [0, 0]
    assert torch.allclose(g.confidence, torch.tensor([0.7, 1 / 3]))
    assert torch.allclose(g.entropy[1], torch.tensor(math.log(3)))
    gen = torch.Generator().manual_seed(0)
    s = propose(logits[:1], Sampling(temperature=1.0, top_k=1), gen)  # top-1 sampling is greedy, confidence 1
    assert s.tokens.tolist() == [0] and torch.allclose(s.confidence, torch.ones(1))
    s = propose(logits[:1], Sampling(temperature=1.0, top_p=0.8), gen)  # nucleus {0, 1}: renormalised
    assert s.tokens.item() in (0, 1)
    assert math.isclose(s.confidence.item(), [0.7, 0.2][s.tokens.item()] / 0.9, rel_tol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_steps_policy_nfe(tok, k):
    dlm = _dlm(tok, block_size=4)
    ids = tok(PROMPTS[1])["input_ids"]  # 11 tokens: the first block has 1 masked position, then 4, 4, ...
    res = Engine(dlm, tok).generate(ids, max_new_tokens=13, policy="steps", steps_per_forward=k, stop_token_ids=())
    assert len(res.tokens) == 13
    assert res.nfe == math.ceil(1 / k) + 3 * math.ceil(4 / k)


def test_entropy_policy_decodes(tok):
    dlm = _dlm(tok, block_size=4)
    ids = tok(PROMPTS[0])["input_ids"]
    engine = Engine(dlm, tok)
    loose = engine.generate(ids, max_new_tokens=16, policy="entropy", tau=100.0, stop_token_ids=())
    strict = engine.generate(ids, max_new_tokens=16, policy="entropy", tau=0.0, stop_token_ids=())
    assert loose.nfe == 4 and strict.nfe == 16  # whole blocks vs one token a forward
    assert len(loose.tokens) == len(strict.tokens) == 16


# ----------------------------------------------------------------------------------------------- multi-block
@pytest.mark.parametrize("token_shift", [True, False])
def test_multi_block(tok, token_shift):
    dlm = _dlm(tok, block_size=4, token_shift=token_shift)
    engine = Engine(dlm, tok)
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        for tau in (0.0, 0.6, 0.9):
            single = engine.generate(ids, max_new_tokens=20, tau=tau, stop_token_ids=())
            one_open = engine.generate(ids, max_new_tokens=20, tau=tau, stop_token_ids=(), block_parallel=True,
                                       p_add=1.0)
            assert (one_open.tokens, one_open.nfe) == (single.tokens, single.nfe)
            for extra in ({"p_add": 0.1}, {"p_add": 0.0, "cache_delay": 2, "refresh_every": 3}):
                multi = engine.generate(ids, max_new_tokens=20, tau=tau, stop_token_ids=(), block_parallel=True,
                                        **extra)
                assert len(multi.tokens) == 20 and dlm.config.mask_token_id not in multi.tokens
                if tau == 0.0:
                    assert multi.nfe <= single.nfe


# ----------------------------------------------------------------------------------------------- stops, streaming
def test_stop_token_and_stop_string(tok):
    dlm = _dlm(tok, block_size=4)
    engine = Engine(dlm, tok)
    ids = tok(PROMPTS[0])["input_ids"]
    free = engine.generate(ids, max_new_tokens=24, tau=0.6, stop_token_ids=())
    assert free.stop_reason == "length" and len(free.tokens) == 24
    stop = free.tokens[9]
    res = engine.generate(ids, max_new_tokens=24, tau=0.6, stop_token_ids=(stop,))
    first = free.tokens.index(stop)
    assert res.tokens == free.tokens[: first + 1] and res.stop_reason == "eos"
    assert res.nfe <= free.nfe
    ref = reference_generate(dlm, ids, 24, threshold=0.6, stop_ids=(stop,))
    assert res.tokens == ref.tokens

    text = free.text
    needle = text[len(text) // 2: len(text) // 2 + 3]
    assert needle.strip()
    res = engine.generate(ids, max_new_tokens=24, tau=0.6, stop_token_ids=(), stop_strings=(needle,))
    assert res.stop_reason == "stop_string" and res.text == text[: text.index(needle)]
    assert needle in tok.decode(res.tokens) and needle not in tok.decode(res.tokens[:-1])


def test_streaming_concatenates_to_the_final_text(tok):
    dlm = _dlm(tok, block_size=4)
    engine = Engine(dlm, tok)
    ids = tok(PROMPTS[2])["input_ids"]
    for kwargs in ({}, {"stop_strings": ("e",)}, {"block_parallel": True}):
        stream = engine.stream(ids, max_new_tokens=24, tau=0.6, stop_token_ids=(), **kwargs)
        deltas = list(stream)
        assert "".join(deltas) == stream.result.text
        assert stream.result.text == engine.generate(ids, max_new_tokens=24, tau=0.6, stop_token_ids=(),
                                                     **kwargs).text
        if not kwargs:
            assert len(deltas) > 1


def test_result_metrics(tok):
    dlm = _dlm(tok, block_size=4)
    res = Engine(dlm, tok).generate("the quick brown fox", max_new_tokens=16, tau=0.0, stop_token_ids=())
    assert res.nfe == 4 and res.tpf == 4.0
    assert res.ttft_s is not None and 0 < res.ttft_s <= res.elapsed_s and res.tokens_per_s > 0
    assert "TPF 4.00" in res.summary()


# ----------------------------------------------------------------------------------------------- batching
def test_batch_equals_single(tok):
    dlm = _dlm(tok, block_size=4)
    engine = Engine(dlm, tok)
    prompts = [tok(p)["input_ids"] for p in PROMPTS] + [[5]]
    for kwargs in ({"tau": 0.6}, {"tau": 0.3, "temperature": 0.8, "top_p": 0.9, "seed": 3},
                   {"tau": 0.9, "block_parallel": True}, {"policy": "ar"}):
        single = [engine.generate(p, max_new_tokens=20, stop_token_ids=(), **kwargs) for p in prompts]
        batch = engine.generate_batch(prompts, max_new_tokens=20, stop_token_ids=(), **kwargs)
        assert [(r.tokens, r.nfe) for r in batch] == [(r.tokens, r.nfe) for r in single]
    # a row that stops early leaves the others untouched
    free = engine.generate(prompts[0], max_new_tokens=20, tau=0.6, stop_token_ids=())
    stop = free.tokens[2]
    single = [engine.generate(p, max_new_tokens=20, tau=0.6, stop_token_ids=(stop,)) for p in prompts]
    batch = engine.generate_batch(prompts, max_new_tokens=20, tau=0.6, stop_token_ids=(stop,))
    assert [(r.tokens, r.nfe, r.stop_reason) for r in batch] == [(r.tokens, r.nfe, r.stop_reason) for r in single]
    assert batch[0].stop_reason == "eos" and len(batch[0].tokens) < 20


# ----------------------------------------------------------------------------------------------- errors
def test_bad_parameters(tok):
    dlm = _dlm(tok, block_size=4)
    engine = Engine(dlm, tok)
    for kwargs in ({"tau": 1.5}, {"tau": -0.1}, {"policy": "nope"}, {"policy": "entropy", "tau": -1.0},
                   {"policy": "steps", "steps_per_forward": 0}, {"top_p": 0.0}, {"temperature": -1.0},
                   {"max_new_tokens": 0}, {"p_add": 1.5}, {"policy": "ar", "block_parallel": True},
                   {"cache_delay": 0}):
        with pytest.raises(Ar2dlmError):
            engine.generate([1, 2, 3], **kwargs)
    with pytest.raises(Ar2dlmError):
        make_policy("nope")
    with pytest.raises(Ar2dlmError):
        engine.generate([])
    with pytest.raises(Ar2dlmError):  # the tiny models have a 256-position context window
        engine.generate([5] * 300, max_new_tokens=4)
    res = engine.generate([5] * 250, max_new_tokens=40, tau=0.0, stop_token_ids=())  # cut to the window
    assert len(res.tokens) == 6 and res.stop_reason == "length"
    with pytest.raises(Ar2dlmError):
        Engine(dlm).generate("text needs a tokenizer")
    assert DecodeParams().policy == "threshold"
