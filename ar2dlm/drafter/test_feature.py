"""The feature drafter in the engine: the output is the parent's (greedy, alone, batched, streamed, fused or not),
right drafts are accepted (an oracle drafter commits whole blocks), the features the engine hands it are the
parent's, sampling keeps the parent's joint distribution, and save/load keeps every weight (tiny models)."""

from __future__ import annotations

import copy

import pytest
import torch

from ar2dlm.drafter.feature import FeatureDrafterLM, is_feature_drafter_folder
from ar2dlm.engine import DecodeParams, Engine
from ar2dlm.engine.runner import ModelRunner
from ar2dlm.engine.sampling import Sampling
from ar2dlm.engine.verify import VerifyPolicy
from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.dlm import BlockDiffusionLM
from ar2dlm.model.open import load_dlm
from ar2dlm.testing import (assert_follows_joint, first_two_joint, fixed_proposal, sample_pairs, tiny_model,
                            tiny_tokenizer)

PROMPTS = ["the quick brown fox", "0 1 2 3 4 5 6", "def add(a, b):", "x"]


def randomize(dlm: FeatureDrafterLM, seed: int = 0, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dlm.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def models():
    tok = tiny_tokenizer()
    parent = tiny_model("llama", seed=3, vocab_size=len(tok), num_hidden_layers=4).eval()
    drafter = FeatureDrafterLM.from_base(copy.deepcopy(parent), tok, block_size=4, base_model="tiny", window=6).eval()
    randomize(drafter)
    ar = BlockDiffusionLM.from_base(copy.deepcopy(parent), copy.deepcopy(tok), block_size=1).eval()
    return tok, ar, drafter, parent


def greedy(ar, tok, prompts, n=24):
    return [r.tokens for r in Engine(ar, tok).generate_batch(prompts, DecodeParams(policy="ar", max_new_tokens=n,
                                                                                   stop_token_ids=()))]


@pytest.mark.parametrize("draft_len,lookup,tree", [(1, False, False), (3, False, False), (3, True, False),
                                                 ("auto", True, False), (5, False, True), (8, True, True),
                                                 ("auto", True, True)])
@pytest.mark.parametrize("fused", [True, False])
def test_greedy_verify_is_the_parent(models, draft_len, lookup, tree, fused):
    tok, ar, drafter, _ = models
    want = greedy(ar, tok, PROMPTS)
    params = DecodeParams(policy="verify", draft_len=draft_len, max_new_tokens=24, stop_token_ids=(),
                          lookup_drafts=lookup, draft_tree=tree)
    engine = Engine(drafter, tok, fused=fused)
    assert [r.tokens for r in engine.generate_batch(PROMPTS, params)] == want  # batched
    assert [engine.generate(p, params).tokens for p in PROMPTS] == want  # one at a time
    stream = engine.stream(PROMPTS[0], params)
    text = "".join(stream)
    assert stream.result.tokens == want[0] and text == stream.result.text


def test_ar_is_the_parent_alone(models):
    """`ar` on a feature drafter decodes with the unchanged parent (it never sees a mask token): greedy and batched
    it is the parent's greedy output, one token a forward."""
    tok, ar, drafter, _ = models
    want = greedy(ar, tok, PROMPTS)
    results = Engine(drafter, tok).generate_batch(PROMPTS, DecodeParams(policy="ar", max_new_tokens=24,
                                                                        stop_token_ids=()))
    assert [r.tokens for r in results] == want
    assert all(r.nfe == len(r.tokens) for r in results)


def test_oracle_drafts_commit_whole_blocks(models, monkeypatch):
    """A drafter that drafts the parent's true continuation has every draft accepted: each forward commits the
    block (3 drafts + the parent's own token), so the drafts line up with the positions the parent checks."""
    tok, ar, drafter, _ = models
    ids = tok(PROMPTS[0])["input_ids"]
    want = greedy(ar, tok, [ids], n=24)[0]
    full = ids + want
    vocab = drafter.backbone.get_input_embeddings().weight.shape[0]
    calls, holder = [], {}

    def oracle(self, contexts, anchors, drafts):
        calls.append([c.shape[0] for c in contexts])
        out = torch.full((len(anchors), drafts, vocab), -10.0)
        for row, anchor in enumerate(anchors):
            at = len(holder["state"].toks) - 1  # the anchor is the last committed token
            assert full[at] == anchor
            for k in range(drafts):
                if at + 1 + k < len(full):
                    out[row, k, full[at + 1 + k]] = 10.0
        return out

    monkeypatch.setattr(ModelRunner, "draft", oracle)
    engine = Engine(drafter, tok)
    rid = engine.add_request(ids, DecodeParams(policy="verify", draft_len=3, max_new_tokens=24, stop_token_ids=()))
    holder["state"] = engine.requests[rid].state
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                res = out.result
    assert res.tokens == want
    assert res.nfe == 1 + (24 - 1 + 3) // 4  # the prefill commits 1 token, then 4 per forward


def _second_choice_oracle(full: list[int], holder: dict, vocab: int):
    """A drafter whose first draft puts the parent's true token second (a wrong one first) and every later draft
    first: the right continuation is only on a side branch of a tree."""
    def oracle(self, contexts, anchors, drafts):
        out = torch.full((len(anchors), drafts, vocab), -10.0)
        at = len(holder["state"].toks) - 1
        for k in range(drafts):
            if at + 1 + k < len(full):
                out[0, k, full[at + 1 + k]] = 10.0
        if at + 1 < len(full):
            out[0, 0, (full[at + 1] + 1) % vocab] = 11.0
        return out
    return oracle


@pytest.mark.parametrize("fused", [True, False])
def test_tree_drafts_take_the_drafters_second_choice(models, monkeypatch, fused):
    """A tree of 6 drafts holds the drafter's wrong first choice with its continuation and its right second choice
    with the true continuation: every forward commits 4 tokens along the side branch (a chain would commit 1), the
    output is the parent's, and the context the drafter reads stays the parent's features although the cache is
    kept only up to where the path left the greedy chain (the branch is fed again)."""
    tok, ar, drafter, _ = models
    ids = tok(PROMPTS[0])["input_ids"]
    want = greedy(ar, tok, [ids], n=24)[0]
    holder = {}
    vocab = drafter.backbone.get_input_embeddings().weight.shape[0]
    monkeypatch.setattr(ModelRunner, "draft", _second_choice_oracle(ids + want, holder, vocab))
    engine = Engine(drafter, tok, fused=fused)
    rid = engine.add_request(ids, DecodeParams(policy="verify", draft_len=6, draft_tree=True, max_new_tokens=24,
                                               stop_token_ids=()))
    state = holder["state"] = engine.requests[rid].state
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                res = out.result
        if state.context is not None and len(state.toks) < len(ids) + 24:
            whole = drafter.features_of(torch.tensor([state.toks]))[0]
            n = state.context.shape[0]
            assert torch.allclose(state.context, whole[len(state.toks) - 1 - n:len(state.toks) - 1], atol=1e-4)
            if state.nfe > 1:  # after the prompt's forward: the branch's 3 drafts are not in the cache
                assert state.cached == len(state.toks) - 4
    assert res.tokens == want
    assert res.nfe == 1 + (24 - 1 + 3) // 4
    chain = Engine(drafter, tok, fused=fused).generate(ids, DecodeParams(
        policy="verify", draft_len=3, max_new_tokens=24, stop_token_ids=()))
    assert chain.tokens == want and chain.nfe == 24


def test_sampled_tree_keeps_the_parents_joint_distribution(models, monkeypatch):
    """Sampled, a tree's children are tried in turn as one-hot proposals: the first two tokens still follow the
    parent's joint distribution (top-3 sampling, chi-square at p = 0.001), the second one checked against a tree of 4
    drafts whose first-level candidates are the likeliest tokens of a fixed distribution over the parent's possible
    second tokens plus one it never picks."""
    tok, _, drafter, _ = models
    ids = tok(PROMPTS[0])["input_ids"]
    joint = first_two_joint(drafter, ids, Sampling(temperature=0.3, top_k=3))
    fixed_q = fixed_proposal(joint, drafter.backbone.get_input_embeddings().weight.shape[0])
    monkeypatch.setattr(ModelRunner, "draft", lambda self, contexts, anchors, drafts: fixed_q.clamp_min(1e-9).log()
                        .expand(len(anchors), drafts, -1))
    n = 1500
    counts, offered, accepted = sample_pairs(Engine(drafter, tok, max_running=16), ids, [
        DecodeParams(policy="verify", draft_len=4, draft_tree=True, temperature=0.3, top_k=3, seed=i,
                     max_new_tokens=3, stop_token_ids=()) for i in range(n)])
    assert 0 < accepted < offered
    assert_follows_joint(counts, joint, n)


def test_engine_features_are_the_parents(models):
    """The context the drafter reads after each forward is the parent's hidden states of the committed positions
    (a full forward over the sequence gives the same), fused or Hugging Face forward alike."""
    tok, _, drafter, _ = models
    ids = tok(PROMPTS[1])["input_ids"]
    for fused in (True, False):
        engine = Engine(drafter, tok, fused=fused)
        rid = engine.add_request(ids, DecodeParams(policy="verify", draft_len=2, max_new_tokens=10,
                                                   stop_token_ids=()))
        state = engine.requests[rid].state
        while engine.has_unfinished():
            engine.step()
            if state.context is None:
                continue
            whole = drafter.features_of(torch.tensor([state.toks]))[0]
            n = state.context.shape[0]
            assert torch.allclose(state.context, whole[len(state.toks) - 1 - n:len(state.toks) - 1], atol=1e-4)


def test_tree_drafts_are_refused_where_they_cannot_work(models):
    tok, ar, _, _ = models
    with pytest.raises(Ar2dlmError, match="tree drafts are a feature drafter's"):
        Engine(ar, tok).generate(PROMPTS[0], DecodeParams(policy="verify", draft_len=3, draft_tree=True,
                                                          max_new_tokens=4))
    for bad in ({"draft_every_length": True}, {"policy": "ar"}):
        with pytest.raises(Ar2dlmError, match="draft_tree"):
            DecodeParams.from_mapping({"policy": "verify", "draft_len": 3, "draft_tree": True, **bad})
    assert DecodeParams.from_spec("verify:12+lookup+tree").label == "verify:12+lookup+tree"


def test_feature_drafter_refuses_drafts_for_every_length(models):
    tok, _, drafter, _ = models
    with pytest.raises(Ar2dlmError, match="gated drafter"):
        Engine(drafter, tok).generate(PROMPTS[0], DecodeParams(policy="verify", draft_every_length=True,
                                                               max_new_tokens=4))


def test_save_and_load_keep_the_drafter(models, tmp_path, monkeypatch):
    tok, _, drafter, parent = models
    path = tmp_path / "fd"
    drafter.save_pretrained(path, tok)
    assert is_feature_drafter_folder(path)
    import ar2dlm.model.loading as loading

    monkeypatch.setattr(loading, "load_base", lambda spec, dtype=None, device="cpu": (copy.deepcopy(parent), tok))
    loaded, _ = load_dlm(path)
    for (name, a), b in zip(drafter.drafter_state().items(), loaded.drafter_state().values()):
        assert torch.equal(a, b), name
    feats = torch.randn(2, 6, drafter.feature_dim)
    valid = torch.ones(2, 6, dtype=torch.bool)
    anchors = torch.tensor([5, 7])
    assert torch.equal(drafter.draft_logits(feats, valid, anchors), loaded.draft_logits(feats, valid, anchors))


def test_lookup_drafts_come_first_and_skip_the_drafters_call(models, monkeypatch):
    """With +lookup a forward checks prompt-lookup drafts wherever the last tokens occurred before, and the
    drafter is not called for it; elsewhere the drafter drafts. The output stays the parent's."""
    tok, ar, drafter, _ = models
    prompt = "0 1 2 3 4 5 6 0 1 2 3 4 5 6 0 1 2"  # repeats: lookup finds drafts
    calls = []
    real = ModelRunner.draft
    monkeypatch.setattr(ModelRunner, "draft", lambda self, *a: calls.append(len(a[0])) or real(self, *a))
    params = DecodeParams(policy="verify", draft_len=3, max_new_tokens=24, stop_token_ids=())
    engine = Engine(drafter, tok)
    plain = engine.generate(prompt, params)
    drafter_calls = len(calls)
    looked = engine.generate(prompt, params.replace(lookup_drafts=True))
    assert looked.tokens == plain.tokens == greedy(ar, tok, [prompt])[0]
    assert len(calls) - drafter_calls < drafter_calls  # forwards that checked lookup drafts skipped the drafter
    assert looked.nfe <= plain.nfe


@pytest.mark.parametrize("lookup", [False, True])
def test_sampled_verify_keeps_the_parents_joint_distribution(models, lookup, monkeypatch):
    """The first two sampled tokens, the second drawn by speculative sampling against a feature drafter's draft
    (from a fixed distribution over the parent's possible second tokens plus one it never picks), follow the
    parent's joint distribution (top-3 sampling, chi-square at p = 0.001). With `lookup` the second token is checked
    against a looked-up draft instead (a deterministic proposal, ahead of the drafter's)."""
    tok, _, drafter, _ = models
    ids = tok(PROMPTS[0])["input_ids"]
    joint = first_two_joint(drafter, ids, Sampling(temperature=0.3, top_k=3))
    fixed_q = fixed_proposal(joint, drafter.backbone.get_input_embeddings().weight.shape[0])

    def draft(self, logits, sampling, generator):
        q = fixed_q.expand(logits.shape[0], -1)
        return torch.multinomial(q, 1, generator=generator)[:, 0].tolist(), q

    monkeypatch.setattr(VerifyPolicy, "draft", draft)
    likeliest_second = max(joint, key=joint.get)[1]
    monkeypatch.setattr("ar2dlm.engine.verify.lookup_drafts",
                        lambda toks, n: [likeliest_second] if len(toks) == len(ids) + 1 else [])
    n = 1500
    counts, offered, accepted = sample_pairs(Engine(drafter, tok, max_running=16), ids, [
        DecodeParams(policy="verify", draft_len=2, temperature=0.3, top_k=3, seed=i, max_new_tokens=3,
                     stop_token_ids=(), lookup_drafts=lookup) for i in range(n)])
    assert 0 < accepted < offered
    assert_follows_joint(counts, joint, n)


def test_other_policies_are_refused(models):
    tok, _, drafter, _ = models
    with pytest.raises(Ar2dlmError, match="feature drafter decodes with verify"):
        Engine(drafter, tok).add_request(PROMPTS[0], DecodeParams(policy="threshold", max_new_tokens=4))


def test_served_answers_are_the_parents(models, tmp_path):
    """Through `serve`'s app and the real OpenAI client: the default decoding of a feature drafter
    (verify:auto+lookup+tree)
    answers with the parent's own text, streamed or not; a lossy policy is a 400."""
    import openai

    from ar2dlm.engine.params import AUTO
    from ar2dlm.serving.app import create_app
    from ar2dlm.serving.server import ServerThread
    from ar2dlm.serving.settings import ServeSettings

    tok, ar, drafter, _ = models
    defaults = DecodeParams(policy="verify", draft_len=AUTO, lookup_drafts=True, draft_tree=True, max_new_tokens=12)
    messages = [{"role": "user", "content": PROMPTS[0]}]
    from ar2dlm.engine import encode_prompt

    want = Engine(ar, tok).generate(encode_prompt(tok, PROMPTS[0], chat=True),
                                    DecodeParams(policy="ar", max_new_tokens=12))
    engine = Engine(drafter, tok, max_running=4)
    with ServerThread(create_app(engine, ServeSettings(model_name="fd", defaults=defaults))) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
        whole = client.chat.completions.create(model="fd", messages=messages)
        assert whole.choices[0].message.content == want.text
        chunks = client.chat.completions.create(model="fd", messages=messages, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="fd", messages=messages, extra_body={"ar2dlm": {"policy": "threshold"}})
