"""The verify policy: output identical to the AR model's own greedy decoding, alone, batched, streamed and with
requests joining mid-way; speculative sampling keeps the AR model's distribution (tiny models)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from ar2dlm.engine import DecodeParams, Engine
from ar2dlm.engine.sampling import Sampling, filtered_probs
from ar2dlm.engine.verify import VerifyPolicy
from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.dlm import BlockDiffusionLM, add_mask_token
from ar2dlm.testing import (assert_follows_joint, first_two_joint, fixed_proposal, sample_pairs, tiny_model,
                            tiny_tokenizer)

PROMPTS = ["the quick brown fox", "0 1 2 3 4 5 6", "def add(a, b):", "x"]


@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer()
    add_mask_token(tiny_model("llama", vocab_size=len(t)), t)
    return t


def _hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def parent_and_dlm(tok):
    parent = tiny_model("llama", seed=3, vocab_size=len(tok)).eval()
    dlm = BlockDiffusionLM.from_base(tiny_model("llama", seed=3, vocab_size=len(tok)), tok, block_size=4).eval()
    return parent, dlm


@pytest.mark.parametrize("every_length", [False, True])
@pytest.mark.parametrize("draft_len", [None, 1, 5])
@pytest.mark.parametrize("linear_kernel", ["auto", "default"])
def test_greedy_verify_equals_hf_generate(tok, parent_and_dlm, draft_len, every_length, linear_kernel):
    """(`auto` runs the linear layers on oneDNN where torch has it, the parent on torch's default kernel.)"""
    parent, dlm = parent_and_dlm
    engine = Engine(dlm, tok, linear_kernel=linear_kernel)
    params = DecodeParams(policy="verify", draft_len=draft_len, max_new_tokens=17, stop_token_ids=(),
                          draft_every_length=every_length)
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        res = engine.generate(ids, params)
        assert res.tokens == _hf_greedy(parent, ids, 17), prompt
        assert 1 <= res.nfe <= 17


@pytest.mark.parametrize("wrong_at", [None, 0, 2])
def test_oracle_drafts_are_accepted_and_wrong_ones_corrected(tok, parent_and_dlm, wrong_at):
    """Drafts replaced between steps by the true continuation (a perfect drafter): every forward commits
    draft_len + 1 tokens. With one draft wrong, the forward commits the drafts before it plus the correction. The
    output is the AR model's either way."""
    parent, dlm = parent_and_dlm
    ids = tok(PROMPTS[0])["input_ids"]
    truth = _hf_greedy(parent, ids, 24)
    engine = Engine(dlm, tok)
    rid = engine.add_request(ids, DecodeParams(policy="verify", draft_len=3, max_new_tokens=24, stop_token_ids=()))
    req = engine.requests[rid]
    commits = []
    while engine.has_unfinished():
        state = req.state
        done = len(state.toks) - len(ids)
        if state.nfe:  # after the first forward: a perfect (or once-wrong) drafter
            drafts = truth[done:done + 3]
            if wrong_at is not None and len(drafts) > wrong_at:
                drafts[wrong_at] = (drafts[wrong_at] + 1) % 50
            state.drafts = drafts
        engine.step()
        commits.append(len(req.state.toks) - len(ids) - done if not req.finished else None)
    assert req.tokens == truth
    full = [c for c in commits[1:-1] if c is not None]
    if wrong_at is None:
        assert full and all(c == 4 for c in full)  # 3 drafts + the AR model's token
    else:
        assert full and all(c == wrong_at + 1 for c in full)


@pytest.mark.parametrize("every_length", [False, True])
def test_verify_batched_streamed_and_joining_mid_way(tok, parent_and_dlm, every_length):
    parent, dlm = parent_and_dlm
    params = DecodeParams(policy="verify", max_new_tokens=15, stop_token_ids=(), draft_every_length=every_length)
    expected = [_hf_greedy(parent, tok(p)["input_ids"], 15) for p in PROMPTS]
    engine = Engine(dlm, tok, max_running=2)
    assert [r.tokens for r in engine.generate_batch(PROMPTS, params)] == expected
    mixed = Engine(dlm, tok, max_running=3)  # verify rows beside block-diffusion rows, added over time
    other = DecodeParams(tau=0.5, max_new_tokens=9, stop_token_ids=())
    results = {}
    for i, prompt in enumerate(PROMPTS):
        mixed.add_request(prompt, params, request_id=f"v{i}")
        mixed.add_request(prompt, other, request_id=f"t{i}")
        results.update({o.request_id: o.result for o in mixed.step() if o.finished})
    while mixed.has_unfinished():
        results.update({o.request_id: o.result for o in mixed.step() if o.finished})
    assert [results[f"v{i}"].tokens for i in range(len(PROMPTS))] == expected
    stream = Engine(dlm, tok).stream(PROMPTS[0], params.replace(max_new_tokens=15))
    text = "".join(stream)
    assert text == stream.result.text and stream.result.tokens == expected[0]


@pytest.mark.parametrize("every_length", [False, True])
def test_lookup_drafts_keep_the_output_and_save_forwards(tok, parent_and_dlm, every_length):
    """Drafts from prompt lookup where the model has none: the output stays the AR model's; on prompts the tiny
    model's greedy output repeats, some are accepted after rejected model drafts, so fewer forwards are needed
    (with drafts for every acceptance length the model always has drafts after the first forward)."""
    parent, dlm = parent_and_dlm
    engine = Engine(dlm, tok)
    params = DecodeParams(policy="verify", max_new_tokens=24, stop_token_ids=(), draft_every_length=every_length)
    saved = 0
    for prompt in PROMPTS + ["a b c a b c a b c a b"]:
        ids = tok(prompt)["input_ids"]
        plain = engine.generate(ids, params)
        looked = engine.generate(ids, params.replace(lookup_drafts=True))
        assert looked.tokens == plain.tokens == _hf_greedy(parent, ids, 24), prompt
        saved += plain.nfe - looked.nfe
    assert saved > 0 or every_length
    assert DecodeParams.from_spec("verify:2+all+lookup").label == "verify:2+all+lookup"
    with pytest.raises(Ar2dlmError, match="verify"):
        DecodeParams(policy="threshold", lookup_drafts=True)


def test_verify_stops_and_limits(tok, parent_and_dlm):
    parent, dlm = parent_and_dlm
    ids = tok(PROMPTS[1])["input_ids"]
    free = _hf_greedy(parent, ids, 12)
    stop = free[5]
    res = Engine(dlm, tok).generate(ids, DecodeParams(policy="verify", max_new_tokens=12, stop_token_ids=(stop,)))
    assert res.tokens == free[:free.index(stop) + 1] and res.stop_reason == "eos"
    for n in (1, 2, 3):
        assert Engine(dlm, tok).generate(ids, policy="verify", max_new_tokens=n, stop_token_ids=()).tokens == free[:n]


def test_verify_needs_token_shift(tok):
    dlm = BlockDiffusionLM.from_base(tiny_model("llama", seed=3, vocab_size=len(tok)), tok, block_size=4,
                                     token_shift=False).eval()
    with pytest.raises(Ar2dlmError, match="token shift"):
        Engine(dlm, tok).generate(PROMPTS[0], policy="verify", max_new_tokens=4)
    with pytest.raises(Ar2dlmError):
        DecodeParams(policy="verify", block_parallel=True)
    with pytest.raises(Ar2dlmError):
        DecodeParams(policy="verify", draft_len=0)
    assert DecodeParams.from_spec("verify:3").draft_len == 3 and DecodeParams.from_spec("verify:3").label == "verify:3"
    every = DecodeParams.from_spec("verify:2+all")
    assert every.draft_every_length and every.draft_len == 2 and every.label == "verify:2+all"
    with pytest.raises(Ar2dlmError, match="verify"):
        DecodeParams(policy="ar", draft_every_length=True)
    with pytest.raises(Ar2dlmError, match="suffix"):
        DecodeParams.from_spec("verify:2+everything")


def test_speculative_sampling_keeps_the_target_distribution():
    """On a 5-token vocabulary: drafts from a distribution q, verified against p; the first committed token must be
    distributed as p (chi-square test), whatever q is, and the acceptance rate must be sum(min(p, q))."""
    torch.manual_seed(0)
    p_logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0]])
    q = torch.tensor([[0.05, 0.05, 0.6, 0.2, 0.1]])
    policy, sampling = VerifyPolicy(), Sampling(temperature=1.0)
    gen = torch.Generator().manual_seed(1)
    counts, accepted, n = Counter(), 0, 20000
    for _ in range(n):
        draft = int(torch.multinomial(q[0], 1, generator=gen))
        a, token = policy.accept([draft], q, p_logits, sampling, gen)
        accepted += a
        counts[draft if a else token] += 1
    p = p_logits[0].softmax(-1)
    chi2 = sum((counts[i] - n * p[i].item()) ** 2 / (n * p[i].item()) for i in range(5))
    assert chi2 < 18.5  # 4 degrees of freedom, p = 0.001
    assert math.isclose(accepted / n, torch.minimum(p, q[0]).sum().item(), abs_tol=0.015)


def test_gated_drafter_verify_is_exactly_the_parent(tok, parent_and_dlm):
    """A gated drafter whose adapter is far from zero: its drafts change, its output stays the parent's."""
    from ar2dlm.drafter.gated import GatedDrafterLM, GatedLoRALinear

    parent, _ = parent_and_dlm
    drafter = GatedDrafterLM.from_base(tiny_model("llama", seed=3, vocab_size=len(tok)), tok, block_size=4, rank=4)
    torch.manual_seed(0)
    with torch.no_grad():
        for m in drafter.modules():
            if isinstance(m, GatedLoRALinear):
                m.lora_B.normal_(0, 0.5)
    engine = Engine(drafter.eval(), tok, max_running=2)
    params = DecodeParams(policy="verify", max_new_tokens=16, stop_token_ids=())
    results = engine.generate_batch(PROMPTS, params)
    assert [r.tokens for r in results] == [_hf_greedy(parent, tok(p)["input_ids"], 16) for p in PROMPTS]
    # the adapter does act at the mask positions in the engine's forward: zeroing it changes the drafts
    def first_drafts(model):
        eng = Engine(model, tok)
        rid = eng.add_request(PROMPTS[0], params)
        eng.step()
        return eng.requests[rid].state.drafts

    trained = first_drafts(drafter)
    with torch.no_grad():
        for m in drafter.modules():
            if isinstance(m, GatedLoRALinear):
                m.lora_B.zero_()
    assert first_drafts(drafter) != trained


def _random_adapter_drafter(tok, scale: float = 0.5):
    from ar2dlm.drafter.gated import GatedDrafterLM, GatedLoRALinear

    drafter = GatedDrafterLM.from_base(tiny_model("llama", seed=3, vocab_size=len(tok)), tok, block_size=4, rank=4)
    torch.manual_seed(0)
    with torch.no_grad():
        for m in drafter.modules():
            if isinstance(m, GatedLoRALinear):
                m.lora_B.normal_(0, scale)
    return drafter.eval()


def test_every_length_blocks_draft_as_if_that_prefix_were_accepted(tok):
    """One forward with drafts for every acceptance length: the block assuming `a` accepted drafts gives the logits
    of a separate forward whose committed text is the prompt plus those `a` drafts (same positions, same visible
    prefix), and the clean rows are the AR model's logits after each draft prefix."""
    from ar2dlm.engine.runner import ModelRunner
    from ar2dlm.engine.verify import VerifyState

    drafter = _random_adapter_drafter(tok)
    runner, mask_id = ModelRunner(drafter), drafter.config.mask_token_id

    def first_forward(state):
        cache = runner.new_cache(1)
        cache.reserve(state.slot_limit + 1)
        cache.allocate()
        plan = state.plan()
        return runner.forward(cache, 0, [(state, plan)])[0]

    ids, drafts = tok(PROMPTS[2])["input_ids"], [5, 9, 7]
    every = VerifyState(ids, 20, 3, mask_id, True, every_length=True)
    every.drafts = list(drafts)
    logits = first_forward(every)
    assert logits.shape[0] == len(drafts) + 1 + (len(drafts) + 1) * 3
    for a in range(len(drafts) + 1):
        alone = VerifyState(ids + drafts[:a], 20 - a, 3, mask_id, True)
        expected = first_forward(alone)  # [the AR model's row after the prefix, 3 draft rows]
        block = logits[len(drafts) + 1 + 3 * a: len(drafts) + 1 + 3 * (a + 1)]
        torch.testing.assert_close(block, expected[1:], atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(logits[a], expected[0], atol=2e-4, rtol=1e-4)


def test_every_length_has_drafts_after_a_rejection(tok, parent_and_dlm):
    """Without it, a forward after a rejected draft has nothing to check; with it, the drafts come from the block
    that assumed the accepted prefix, so every forward (but the first) checks drafts."""
    parent, _ = parent_and_dlm
    drafter = _random_adapter_drafter(tok)
    ids = tok(PROMPTS[0])["input_ids"]
    for every_length in (False, True):
        engine = Engine(drafter, tok)
        params = DecodeParams(policy="verify", draft_len=3, max_new_tokens=24, stop_token_ids=(),
                              draft_every_length=every_length)
        rid = engine.add_request(ids, params)
        req, empty = engine.requests[rid], 0
        while engine.has_unfinished():
            engine.step()
            empty += not req.finished and req.state.nfe and not req.state.drafts
        assert req.tokens == _hf_greedy(parent, ids, 24)
        assert (empty == 0) if every_length else (empty > 0)


@pytest.mark.parametrize("every_length,lookup", [(False, False), (True, False), (False, True)])
def test_sampled_verify_keeps_the_ar_models_joint_distribution(tok, every_length, lookup, monkeypatch):
    """End to end through the engine: the first two sampled tokens, the second drawn by speculative sampling against
    a draft, follow the AR model's own joint distribution (top-3 sampling, chi-square test at p = 0.001). The drafts
    come from a fixed distribution over the tokens the AR model may pick second (a random adapter's drafts would
    never be among its top 3), so both acceptance and rejection happen. With `lookup` the first forward checks a
    looked-up draft of the first token instead (a deterministic proposal: one-hot q)."""
    drafter = _random_adapter_drafter(tok)
    ids = tok(PROMPTS[0])["input_ids"]
    sampling = Sampling(temperature=0.3, top_k=3)  # peaked: a wrong rejection rule shows
    joint = first_two_joint(drafter, ids, sampling)
    fixed_q = fixed_proposal(joint, drafter.backbone.get_input_embeddings().weight.shape[0])
    with torch.no_grad():
        p1 = filtered_probs(drafter(torch.tensor([ids]))[0][0, -1], sampling)

    def draft(self, mask_logits, sampling, generator):
        q = fixed_q.expand(mask_logits.shape[0], -1)
        return torch.multinomial(q, 1, generator=generator)[:, 0].tolist(), q

    monkeypatch.setattr(VerifyPolicy, "draft", draft)
    second_likeliest = int(p1.argsort(descending=True)[1])
    monkeypatch.setattr("ar2dlm.engine.verify.lookup_drafts",
                        lambda toks, n: [second_likeliest] if len(toks) == len(ids) else [])
    n = 1500
    counts, offered, accepted = sample_pairs(Engine(drafter, tok, max_running=16), ids, [
        DecodeParams(policy="verify", draft_len=2, temperature=0.3, top_k=3, seed=i, max_new_tokens=3,
                     stop_token_ids=(), lookup_drafts=lookup, draft_every_length=every_length) for i in range(n)])
    assert 0 < accepted < offered  # drafts were checked, some accepted and some rejected
    assert_follows_joint(counts, joint, n)


def test_verify_on_a_full_dlm_says_it_is_the_models_own_head(tok, parent_and_dlm, caplog):
    _, dlm = parent_and_dlm
    engine = Engine(dlm, tok)
    with caplog.at_level("WARNING", logger="ar2dlm.engine.engine"):
        engine.generate(PROMPTS[0], policy="verify", max_new_tokens=3)
        engine.generate(PROMPTS[1], policy="verify", max_new_tokens=3)
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1  # once per engine
    assert "own AR head" in caplog.records[0].message and "not its parent" in caplog.records[0].message
    caplog.clear()
    with caplog.at_level("WARNING", logger="ar2dlm.engine.engine"):
        Engine(_random_adapter_drafter(tok), tok).generate(PROMPTS[0], policy="verify", max_new_tokens=3)
    assert not caplog.records  # a gated drafter verifies with the parent itself
