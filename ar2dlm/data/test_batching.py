"""Batches: padding, seeded epochs that cover every example once, exact resume, DDP shards; the held-out split."""

import json

import pytest
import torch

from ar2dlm.data.batching import Batcher
from ar2dlm.data.tokenize import Example, split_heldout
from ar2dlm.errors import Ar2dlmError


def make_examples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 20, (1,), generator=g))
        ids = [10 + i] * length
        out.append(Example(ids, [j >= length // 2 for j in range(length)]))
    return out


def test_split_heldout_deterministic_and_disjoint():
    ex = make_examples(30)
    train, held = split_heldout(ex, 5, seed=3)
    train2, held2 = split_heldout(ex, 5, seed=3)
    assert [e.input_ids for e in held] == [e.input_ids for e in held2] and len(held) == 5 and len(train) == 25
    assert {id(e) for e in train} | {id(e) for e in held} == {id(e) for e in ex}
    assert not {id(e) for e in train} & {id(e) for e in held}
    assert [e.input_ids for e in split_heldout(ex, 5, seed=4)[1]] != [e.input_ids for e in held]
    assert split_heldout(ex, 0, seed=0) == (ex, [])
    with pytest.raises(Ar2dlmError):
        split_heldout(ex, 30, seed=0)


def rows(batch):
    return [tuple(r[:n].tolist()) for r, n in zip(batch.input_ids, batch.lengths)]


def test_batcher_shapes_padding_and_determinism():
    ex = make_examples(23)
    a, b = Batcher(ex, 4, seed=1, pad_id=0), Batcher(ex, 4, seed=1, pad_id=0)
    for _ in range(12):
        x, y = next(a), next(b)
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.maskable, y.maskable)
        assert x.input_ids.dtype == torch.long and x.maskable.dtype == torch.bool and x.lengths.dtype == torch.long
        n, width = x.input_ids.shape
        assert n == 4 and width % 8 == 0 and width >= int(x.lengths.max()) and width - int(x.lengths.max()) < 8
        for i, length in enumerate(x.lengths.tolist()):
            assert not x.maskable[i, length:].any() and (x.input_ids[i, length:] == 0).all()
            e = next(e for e in ex if tuple(e.input_ids) == tuple(x.input_ids[i, :length].tolist()))
            assert x.maskable[i, :length].tolist() == e.maskable
    c = Batcher(ex, 4, seed=2, pad_id=0)
    assert any(rows(next(c)) != rows(next(Batcher(ex, 4, seed=1, pad_id=0))) for _ in range(3))


def test_batcher_epochs_cover_every_example_once():
    ex = make_examples(10)
    bt = Batcher(ex, 4, seed=0, pad_id=0)
    seen = [r for _ in range(5) for r in rows(next(bt))]  # 20 rows = exactly two epochs
    assert bt.state_dict() == {"epoch": 2, "index": 0}
    ids = sorted(tuple(e.input_ids) for e in ex)
    assert sorted(seen[:10]) == ids and sorted(seen[10:]) == ids and seen[:10] != seen[10:]
    ordered = Batcher(ex, 5, seed=0, pad_id=0, shuffle=False)
    assert rows(next(ordered)) == [tuple(e.input_ids) for e in ex[:5]]


@pytest.mark.parametrize("k", [0, 1, 3, 7])
def test_batcher_exact_resume(k):
    ex = make_examples(17)
    ref = Batcher(ex, 3, seed=5, pad_id=0)
    expected = [next(ref) for _ in range(k + 6)][k:]
    first = Batcher(ex, 3, seed=5, pad_id=0)
    for _ in range(k):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = Batcher(ex, 3, seed=5, pad_id=0)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.maskable, want.maskable)


def test_batcher_ddp_shards_are_disjoint_and_in_step():
    ex = make_examples(26)
    world = 3
    ranks = [Batcher(ex, 2, seed=9, pad_id=0, rank=r, world_size=world) for r in range(world)]
    single = Batcher(ex, 2 * world, seed=9, pad_id=0)
    for _ in range(6):
        parts = [rows(next(b)) for b in ranks]
        glob = rows(next(single))
        assert all(len(p) == 2 for p in parts)
        for r in range(world):
            assert parts[r] == glob[r::world]
        flat = [x for p in parts for x in p]
        assert sorted(flat) == sorted(glob)
    assert len({json.dumps(b.state_dict()) for b in ranks}) == 1


def test_batcher_rejects_bad_state_and_args():
    ex = make_examples(5)
    with pytest.raises(Ar2dlmError):
        Batcher(ex, 2, seed=0, pad_id=0).load_state_dict({"epoch": 0, "index": 99})
    with pytest.raises(Ar2dlmError):
        Batcher([], 2, seed=0, pad_id=0)
    with pytest.raises(Ar2dlmError):
        Batcher(ex, 2, seed=0, pad_id=0, rank=2, world_size=2)
