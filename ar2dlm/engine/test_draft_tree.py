"""Tree drafts: the likeliest prefixes of per-position distributions, their feeding order, the parent's walk and
who sees whom."""

from __future__ import annotations

import itertools
import math

import torch

from ar2dlm.engine.draft_tree import grow_tree, layout, sampled_walk, tree_visibility, walk
from ar2dlm.engine.sampling import Sampling


def _logits(probs: list[dict[int, float]], vocab: int = 10) -> torch.Tensor:
    """Per-position distributions given as {token: probability} (the rest of the mass spread evenly)."""
    rows = []
    for dist in probs:
        rest = (1 - sum(dist.values())) / (vocab - len(dist))
        rows.append([math.log(dist.get(t, rest)) for t in range(vocab)])
    return torch.tensor(rows)


def test_the_tree_holds_the_likeliest_prefixes_best_first():
    logits = _logits([{1: 0.6, 2: 0.3}, {3: 0.9}, {4: 0.55, 5: 0.35}])  # no two prefixes equally likely
    tree = grow_tree(logits, 6, top_k=2)
    paths = []
    for i in range(len(tree.tokens)):
        path, node = [], i
        while node >= 0:
            path.insert(0, tree.tokens[node])
            node = tree.parents[node]
        paths.append(tuple(path))
        assert tree.depths[i] == len(path) and tree.parents[i] < i  # a parent before its children
    # every prefix of top-2 choices per position, scored by the product of its probabilities (a token of the evenly
    # spread rest stands as 0: such prefixes are far below the 6 best)
    top2 = [[1, 2], [3, 0], [4, 5]]
    prob = lambda path: math.prod(math.exp(logits[d, t]) for d, t in enumerate(path))  # noqa: E731
    every = [p for n in (1, 2, 3) for p in itertools.product(*top2[:n])]
    assert paths == sorted(every, key=prob, reverse=True)[:6]
    assert [p for p, g in zip(paths, tree.greedy) if g] == [(1,), (1, 3), (1, 3, 4)]


def test_layout_feeds_the_greedy_chain_first_and_cuts_by_size_and_depth():
    tree = grow_tree(_logits([{1: 0.5, 2: 0.45}, {3: 0.9}, {4: 0.9}]), 6, top_k=2)
    order = layout(tree, 6, max_depth=3)
    chain = [i for i in order if tree.greedy[i]]
    assert order[:len(chain)] == chain and [tree.depths[i] for i in chain] == [1, 2, 3]
    assert sorted(order) == list(range(6))
    assert all(tree.depths[i] <= 2 for i in layout(tree, 6, max_depth=2))
    small = layout(tree, 3, max_depth=3)
    assert len(small) == 3 and all(tree.parents[i] in small + [-1] for i in small)  # still a tree


def test_walk_follows_the_parents_choices():
    tokens, parents = [5, 6, 7, 8], [-1, 0, -1, 2]  # two branches: 5 -> 6 and 7 -> 8
    assert walk(tokens, parents, [7, 0, 0, 8, 9]) == [2, 3]  # 7, then 8 after it
    assert walk(tokens, parents, [5, 6, 0, 0, 0]) == [0, 1]
    assert walk(tokens, parents, [9, 6, 0, 8, 0]) == []  # the parent's first token is in no draft
    assert walk(tokens, parents, [5, 9, 6, 8, 0]) == [0]  # choices[1] is after draft 0: 9 is no child of 5


def test_a_draft_sees_the_committed_tokens_and_its_ancestors():
    visible = tree_visibility(2, [-1, 0, -1, 2])
    assert visible[:2, :2].tolist() == [[True, False], [True, True]]  # committed: token-causal
    assert not visible[:2, 2:].any()  # committed tokens see no draft
    assert visible[2:, :2].all()  # every draft sees every committed token
    drafts = visible[2:, 2:].int().tolist()
    assert drafts == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]


def test_a_sampled_walk_commits_the_parents_distribution():
    """Children 1 and 3 of the root tried as one-hot proposals, then a sample from what is left: the token committed
    first is distributed as the parent's (p), children are accepted with their mass together, and an accepted
    child's own child is tried against the row after it."""
    p = torch.tensor([0.1, 0.4, 0.05, 0.25, 0.2])
    # rows: the parent after the last committed token, then after each draft (token 1, token 3, token 4 after 1)
    logits = torch.stack([p.log(), torch.tensor([0.0, 0.0, 0.0, 0.0, 2.0]), torch.zeros(5), torch.zeros(5)])
    tokens, parents = [1, 3, 4], [-1, -1, 0]
    gen = torch.Generator().manual_seed(0)
    n, firsts, accepted = 20000, torch.zeros(5), 0
    for _ in range(n):
        path, token = sampled_walk(tokens, parents, logits, Sampling(temperature=1.0), gen)
        first = tokens[path[0]] if path else token
        firsts[first] += 1
        accepted += bool(path)
        assert not path or path[0] in (0, 1)
        assert len(path) < 2 or path == [0, 2]
    assert torch.allclose(firsts / n, p, atol=0.012)
    assert abs(accepted / n - 0.65) < 0.012  # p(1) + p(3)
