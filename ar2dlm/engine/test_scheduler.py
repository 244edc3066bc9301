"""Continuous batching: requests join and leave a running batch at forward boundaries, and each one decodes exactly
what it decodes alone (tiny models)."""

from __future__ import annotations

import pytest
import torch

from ar2dlm.engine import DecodeParams, Engine
from ar2dlm.engine.kv_cache import KVCachePool
from ar2dlm.engine.request import Status
from ar2dlm.model.dlm import BlockDiffusionLM, add_mask_token
from ar2dlm.testing import record_forwards, tiny_model, tiny_tokenizer

PROMPTS = ["the quick brown fox", "0 1 2 3 4 5 6", "def add(a, b):", "x", "hello there, how are you doing today?"]


@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer()
    add_mask_token(tiny_model("llama", vocab_size=len(t)), t)
    return t


@pytest.fixture(scope="module")
def dlm(tok):
    model = tiny_model("llama", seed=1, vocab_size=len(tok))
    with torch.no_grad():
        model.model.norm.weight.mul_(50.0)  # confidences spread over (0, 1): partial commits at tau 0.6
    return BlockDiffusionLM.from_base(model, tok, block_size=4).eval()


SETTINGS = [DecodeParams(tau=0.6, max_new_tokens=18, stop_token_ids=()),
            DecodeParams(policy="ar", max_new_tokens=11, stop_token_ids=()),
            DecodeParams(tau=0.3, temperature=0.8, top_p=0.9, seed=5, max_new_tokens=14, stop_token_ids=()),
            DecodeParams(tau=0.9, block_parallel=True, max_new_tokens=21, stop_token_ids=())]


def _alone(dlm, tok, prompt, params):
    return Engine(dlm, tok).generate(prompt, params)


def test_requests_joining_mid_batch_decode_as_alone(dlm, tok):
    """Requests arrive while others run (mixed prompts, lengths and policies); each one's tokens and NFE equal its
    batch-size-1 run."""
    jobs = [(PROMPTS[i % len(PROMPTS)], SETTINGS[i % len(SETTINGS)]) for i in range(9)]
    expected = [_alone(dlm, tok, p, s) for p, s in jobs]
    engine = Engine(dlm, tok, max_running=3)
    arrivals = {0: [0, 1], 2: [2], 3: [3, 4, 5], 7: [6], 9: [7, 8]}  # step -> jobs added before it
    results, step = {}, 0
    while len(results) < len(jobs):
        for j in arrivals.get(step, []):
            engine.add_request(jobs[j][0], jobs[j][1], request_id=str(j))
        assert engine.num_running <= 3
        for out in engine.step():
            if out.finished:
                results[int(out.request_id)] = out.result
        step += 1
        assert step < 500
    for j, exp in enumerate(expected):
        assert (results[j].tokens, results[j].nfe) == (exp.tokens, exp.nfe), j
    assert not engine.has_unfinished() and engine.cache.used == 0


def test_generate_batch_beyond_the_row_limit_queues(dlm, tok):
    prompts = PROMPTS * 2
    params = DecodeParams(tau=0.6, max_new_tokens=12, stop_token_ids=())
    expected = [_alone(dlm, tok, p, params) for p in prompts]
    batch = Engine(dlm, tok, max_running=2).generate_batch(prompts, params)
    assert [(r.tokens, r.nfe) for r in batch] == [(r.tokens, r.nfe) for r in expected]
    assert max(r.queued_s for r in batch) > 0  # the late ones waited for a row


def test_cancel_frees_its_row_at_once(dlm, tok):
    engine = Engine(dlm, tok, max_running=2)
    params = DecodeParams(policy="ar", max_new_tokens=30, stop_token_ids=())
    a = engine.add_request(PROMPTS[0], params)
    b = engine.add_request(PROMPTS[1], params)
    c = engine.add_request(PROMPTS[2], params)
    engine.step(), engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 1
    assert engine.abort(a) and not engine.abort(a)
    assert engine.cache.used == 1 and engine.num_running == 1
    engine.step()  # c takes the freed row at the next step
    assert engine.num_running == 2 and engine.scheduler.running[engine.scheduler.running.index(
        next(r for r in engine.scheduler.running if r.request_id == c))].status is Status.RUNNING
    assert engine.abort(c) and engine.abort(b) and engine.cache.used == 0 and not engine.has_unfinished()
    # a waiting request can be cancelled too, and the engine is still usable afterwards
    w = [engine.add_request(PROMPTS[3], params) for _ in range(3)]
    assert engine.abort(w[2]) and engine.num_waiting == 3 - 1
    alone = _alone(dlm, tok, PROMPTS[3], params)
    results = {}
    while engine.has_unfinished():
        results.update({o.request_id: o.result for o in engine.step() if o.finished})
    assert set(results) == set(w[:2]) and all(r.tokens == alone.tokens for r in results.values())


def test_moved_rows_keep_their_cache(dlm, tok):
    """Finishing the first of three running requests moves the last one into its row: the moved request's cached
    keys/values go with it, so it still decodes exactly as alone."""
    params = DecodeParams(tau=0.6, max_new_tokens=24, stop_token_ids=())
    short = params.replace(max_new_tokens=5)
    engine = Engine(dlm, tok, max_running=3)
    ids = [engine.add_request(PROMPTS[0], short), engine.add_request(PROMPTS[1], params),
           engine.add_request(PROMPTS[4], params)]
    results, moved = {}, False
    while engine.has_unfinished():
        rows_before = {r.request_id: r.row for r in engine.scheduler.running}
        results.update({o.request_id: o.result for o in engine.step() if o.finished})
        moved |= any(r.row != rows_before.get(r.request_id, r.row) for r in engine.scheduler.running)
    assert moved
    for rid, prompt, p in zip(ids, (PROMPTS[0], PROMPTS[1], PROMPTS[4]), (short, params, params)):
        exp = _alone(dlm, tok, prompt, p)
        assert (results[rid].tokens, results[rid].nfe) == (exp.tokens, exp.nfe)


def test_no_starvation_and_first_come_first_served(dlm, tok):
    """A stream of arrivals that keeps the queue full: requests are admitted in arrival order, prefill and decode
    forwards alternate, and every request finishes."""
    engine = Engine(dlm, tok, max_running=2)
    params = DecodeParams(tau=0.6, max_new_tokens=8, stop_token_ids=())
    admitted, finished, kinds = [], [], []
    for i in range(12):
        engine.add_request(PROMPTS[i % len(PROMPTS)], params, request_id=f"r{i}")
        for _ in range(2):  # two steps per arrival: the queue grows faster than it drains
            before = {r.request_id for r in engine.scheduler.running}
            fwd_kinds = engine.scheduler
            finished += [o.request_id for o in engine.step() if o.finished]
            admitted += [r.request_id for r in engine.scheduler.running if r.request_id not in before]
            kinds.append(fwd_kinds._last_prefill)
    while engine.has_unfinished():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert sorted(finished, key=lambda r: int(r[1:])) == [f"r{i}" for i in range(12)]
    assert admitted == sorted(admitted, key=lambda r: int(r[1:]))
    assert not any(a and b for a, b in zip(kinds, kinds[1:]))  # never two prefill forwards in a row


def test_prefill_budget_splits_new_requests(dlm, tok):
    """New requests whose padded prompt ranges exceed max_fed_tokens are prefilled over several forwards."""
    engine = Engine(dlm, tok, max_running=4, max_fed_tokens=20)
    fed = record_forwards(engine.runner)
    params = DecodeParams(tau=0.6, max_new_tokens=8, stop_token_ids=())
    res = engine.generate_batch([PROMPTS[0], PROMPTS[1], PROMPTS[2]], params)
    assert all(b * q <= 20 or b == 1 for b, q, _ in fed[:2])
    assert [r.tokens for r in res] == [_alone(dlm, tok, p, params).tokens for p in PROMPTS[:3]]


def test_pool_grows_and_moves_rows():
    pool = KVCachePool(num_layers=2, max_rows=3, length=8)
    rows = [pool.allocate() for _ in range(3)]
    assert rows == [0, 1, 2] and pool.free_rows == 0
    with pytest.raises(RuntimeError):
        pool.allocate()
    k = torch.arange(3 * 2 * 3 * 4, dtype=torch.float32).reshape(3, 2, 3, 4)
    pool.bind(0, torch.tensor([[0, 1, 2]] * 3), kv_len=3)
    for layer in pool.layers:
        layer.update(k, -k)
    pool.reserve(100)
    assert pool.length == 128 and pool.layers[0].keys.shape[2] == 128
    assert torch.equal(pool.layers[1].keys[:, :, :3], k)  # growth keeps the contents
    assert pool.free(0, last_row_slots=3) == 2  # row 2 moved into row 0
    assert torch.equal(pool.layers[0].keys[0, :, :3], k[2]) and torch.equal(pool.layers[0].values[0, :, :3], -k[2])
    assert pool.free(1, last_row_slots=3) is None and pool.used == 1
