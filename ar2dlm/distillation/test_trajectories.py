"""Trajectory replay against the real decoder, and the trajectory file (resume, validation)."""

import json

import pytest
import torch

from ar2dlm.data.tokenize import Example
from ar2dlm.distillation.trajectories import read_trajectories, replay, replay_ranks, write_trajectories
from ar2dlm.engine import DecodeParams, Engine
from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.dlm import BlockDiffusionLM
from ar2dlm.testing import tiny_model, tiny_tokenizer


def _dlm(token_shift=True, block_size=4, seed=5):
    tok = tiny_tokenizer()
    model = tiny_model("llama", seed=seed, vocab_size=len(tok))
    return BlockDiffusionLM.from_base(model, tok, block_size=block_size, token_shift=token_shift).eval(), tok


def _engine_order(engine, prompt, cfg):
    """The step (inside its block) at which the engine committed each generated position, read from the request's
    block state after every step."""
    rid = engine.add_request(prompt, cfg)
    state = engine.requests[rid].state
    B = engine.dlm.config.block_size
    seen, steps_in_block = None, {}
    while True:
        outputs = engine.step()
        pending = list(state.pending)
        if seen is not None:
            for p, (was, now) in enumerate(zip(seen, pending)):
                if was and not now:
                    blk = p // B
                    steps_in_block[p] = sum(1 for q in steps_in_block if q // B == blk)
        else:
            for p in range(state.prompt_len, len(pending)):
                if not pending[p]:
                    steps_in_block[p] = 0
        seen = pending
        done = [o.result for o in outputs if o.finished]
        if done:
            return done[0], steps_in_block


@pytest.mark.parametrize("token_shift", [True, False])
@pytest.mark.parametrize("prompt_len", [6, 8])
def test_replay_reproduces_the_engine_decoding_order(token_shift, prompt_len):
    """The teacher's own greedy one-token-a-forward answer, replayed with forced tokens, gives the exact order in
    which the engine committed it (single-block decoding sees only final earlier blocks, as replay does)."""
    dlm, tok = _dlm(token_shift)
    torch.manual_seed(0)
    prompt = torch.randint(3, len(tok) - 1, (prompt_len,)).tolist()
    cfg = DecodeParams(max_new_tokens=14, policy="steps", steps_per_forward=1, stop_token_ids=())
    engine = Engine(dlm, tok)
    res, order = _engine_order(engine, prompt, cfg)
    assert len(res.tokens) == 14
    ex = Example(prompt + res.tokens, [False] * prompt_len + [True] * 14)
    traj = replay(dlm, [ex], tok.pad_token_id, rank_by="confidence")[0]
    assert traj.rank[:prompt_len] == [-1] * prompt_len
    assert traj.rank[prompt_len:] == [order[p] for p in range(prompt_len, prompt_len + 14)]
    if not token_shift:  # a real ordering, not left to right (with token shift a random model is most sure of the
        # position right after a real token, so it does decode left to right)
        full = [traj.rank[s:s + 4] for s in range(8, len(traj.rank), 4) if len(traj.rank[s:s + 4]) == 4]
        assert any(b != sorted(b) for b in full)


def test_replay_is_batch_independent_and_ranks_are_permutations():
    dlm, tok = _dlm()
    g = torch.Generator().manual_seed(1)
    exs = []
    for n_prompt, n_gen in [(5, 11), (9, 7), (3, 20)]:
        ids = torch.randint(3, len(tok) - 1, (n_prompt + n_gen,), generator=g).tolist()
        exs.append(Example(ids, [False] * n_prompt + [True] * n_gen))
    together = replay(dlm, exs, tok.pad_token_id)
    alone = [replay(dlm, [e], tok.pad_token_id)[0] for e in exs]
    assert [t.rank for t in together] == [t.rank for t in alone]
    for e, t in zip(exs, together):
        for start in range(0, len(e), 4):
            got = [r for r in t.rank[start:start + 4] if r >= 0]
            assert sorted(got) == list(range(len(got)))


def test_rank_by_variants_differ_and_bad_name_fails():
    dlm, tok = _dlm()
    ids = torch.randint(3, len(tok) - 1, (1, 24), generator=torch.Generator().manual_seed(2))
    gen = torch.zeros(1, 24, dtype=torch.bool)
    gen[:, 4:] = True
    ranks = {k: replay_ranks(dlm, ids, gen, rank_by=k) for k in ("confidence", "entropy", "target")}
    assert not torch.equal(ranks["confidence"], ranks["target"])
    with pytest.raises(Ar2dlmError):
        replay_ranks(dlm, ids, gen, rank_by="vibes")


def test_trajectory_file_resumes_after_a_crash(tmp_path):
    dlm, tok = _dlm()
    g = torch.Generator().manual_seed(3)
    exs = [Example(torch.randint(3, 200, (12,), generator=g).tolist(), [False] * 4 + [True] * 8) for _ in range(7)]
    meta = {"block_size": 4, "teacher": "tiny"}
    clean = write_trajectories(tmp_path / "a.jsonl", exs, dlm, tok.pad_token_id, rank_by="confidence", meta=meta,
                               batch_size=3)

    calls = []

    def crash_on_second_batch(group):
        calls.append(len(group))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return group

    with pytest.raises(KeyboardInterrupt):
        write_trajectories(tmp_path / "b.jsonl", exs, dlm, tok.pad_token_id, rank_by="confidence", meta=meta,
                           batch_size=3, make_targets=crash_on_second_batch)
    assert not (tmp_path / "b.jsonl").exists()
    assert len((tmp_path / "b.jsonl.partial").read_text().splitlines()) == 3
    calls.clear()
    resumed = write_trajectories(tmp_path / "b.jsonl", exs, dlm, tok.pad_token_id, rank_by="confidence", meta=meta,
                                 batch_size=3, make_targets=lambda gr: calls.append(len(gr)) or gr)
    assert calls == [3, 1]  # only the unfinished batches
    assert resumed.read_text() == clean.read_text()
    trajs = read_trajectories(resumed, block_size=4)
    assert len(trajs) == 7 and all(t.rank[:4] == [-1] * 4 for t in trajs)


def test_bad_trajectory_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input_ids": [1, 2], "rank": [-1, 0], "block_size": 8}) + "\n")
    with pytest.raises(Ar2dlmError, match="block size 8"):
        read_trajectories(bad, block_size=4)
    bad.write_text(json.dumps({"input_ids": [1, 2], "rank": [-1]}) + "\n")
    with pytest.raises(Ar2dlmError, match=r"bad.jsonl:1"):
        read_trajectories(bad, block_size=4)
    bad.write_text("")
    with pytest.raises(Ar2dlmError, match="no trajectories"):
        read_trajectories(bad, block_size=4)
