"""Tree drafts: a feature drafter's drafts as a tree of its likeliest continuations, all checked in one forward.

The block drafter predicts every position of its block at once, a distribution per position (not per prefix), so
its likeliest continuations are combinations of per-position choices (Medusa's trees; EAGLE-2 grows its trees by
the drafter's confidence the same way). A tree of N drafts holds the N likeliest prefixes, a prefix scoring the sum
of its tokens' log-probabilities among each position's `TOP_K` likeliest tokens: a prefix scores at least as much
as any of its extensions, so the N best are closed under taking prefixes and form a tree. It starts with the greedy
chain's likeliest drafts and, where the drafter is unsure, adds its second and third choices instead of drafts deep
in a chain that is likely rejected earlier. Offline, on held-out parent answers, a tree of 7 drafts commits 1.98
tokens per forward where the chain of 7 commits 1.68 (16 drafts: 2.13).

One forward checks the whole tree (engine/verify.py): each draft sits at the position of its depth and sees the
committed tokens and its own ancestors only, so its logits are the parent's next-token logits after that path; the
parent's greedy walk from the last committed token commits the longest path it agrees with plus its own next token,
as with a chain. Sampled, the walk is speculative sampling with the children of a node as deterministic proposals
(`sampled_walk`), and the committed tokens are distributed exactly as the parent's own samples. The drafts of the greedy chain come first in the forward, in the slots of their own positions, so
a walk along them leaves the K/V cache valid as a chain does; a walk onto a side branch keeps the cache up to where
it left the chain, and the next forward feeds the branch's committed tokens again.
"""

from __future__ import annotations

import heapq
from typing import NamedTuple

import torch

from ar2dlm.engine.sampling import Sampling, filtered_probs

TOP_K = 4  # alternatives per position a tree may take (the 4th choice is rarely worth a slot)


class DraftTree(NamedTuple):
    tokens: list[int]  # drafts, likeliest prefix first (a parent always before its children)
    parents: list[int]  # index of each draft's parent (-1: the last committed token)
    depths: list[int]  # 1 for the drafts right after the last committed token
    greedy: list[bool]  # on the greedy chain (every token its position's first choice)


def grow_tree(draft_logits: torch.Tensor, size: int, top_k: int = TOP_K) -> DraftTree:
    """The `size` likeliest prefixes of the per-position distributions `draft_logits` [D, V], best first."""
    depth_max = draft_logits.shape[0]
    top = draft_logits.float().log_softmax(-1).topk(min(top_k, draft_logits.shape[-1]), dim=-1)
    scores, choices = top.values.tolist(), top.indices.tolist()
    tree = DraftTree([], [], [], [])
    # candidates: (minus score, choice ranks along the path, parent index); ranks break ties, shorter first
    heap = [(-scores[0][rank], (rank,), -1) for rank in range(len(choices[0]))]
    heapq.heapify(heap)
    while heap and len(tree.tokens) < size:
        minus_score, ranks, parent = heapq.heappop(heap)
        depth = len(ranks)
        index = len(tree.tokens)
        tree.tokens.append(choices[depth - 1][ranks[-1]])
        tree.parents.append(parent)
        tree.depths.append(depth)
        tree.greedy.append(not any(ranks))
        if depth < depth_max:
            for rank in range(len(choices[depth])):
                heapq.heappush(heap, (minus_score - scores[depth][rank], ranks + (rank,), index))
    return tree


def layout(tree: DraftTree, size: int, max_depth: int) -> list[int]:
    """The drafts one forward checks, in the order it feeds them: the `size` likeliest no deeper than `max_depth`
    (a prefix-closed set), those of the greedy chain first by depth, then the others likeliest first."""
    picked = [i for i, depth in enumerate(tree.depths) if depth <= max_depth][:size]
    return [i for i in picked if tree.greedy[i]] + [i for i in picked if not tree.greedy[i]]


def walk(tokens: list[int], parents: list[int], choices: list[int]) -> list[int]:
    """The path the parent's greedy choices follow through fed drafts `tokens` (parents given as indices into the
    same list, -1 for the last committed token): `choices[0]` is its token after the last committed one,
    `choices[1 + j]` its token after draft j. Returns the indices of the accepted drafts, root first."""
    child = {}
    for j, (parent, token) in enumerate(zip(parents, tokens)):
        child.setdefault((parent, token), j)
    path, node = [], -1
    while (node, choices[node + 1]) in child:
        node = child[(node, choices[node + 1])]
        path.append(node)
    return path


def sampled_walk(tokens: list[int], parents: list[int], logits: torch.Tensor, sampling: Sampling,
                 generator: torch.Generator | None) -> tuple[list[int], int]:
    """`walk` for sampled decoding: (the accepted drafts' indices, the token sampled after them). At each node its
    children are tried in turn, each a deterministic (one-hot) proposal: accepted with its probability under the
    parent's distribution `logits[node + 1]` less the children already rejected, renormalised (a one-hot proposal's
    residual is the distribution without it). Each committed token is so distributed exactly as the parent's own
    sample after the path (the argument of speculative sampling, applied once per child), and a node's children are
    accepted with their whole probability mass together."""
    children: dict[int, list[int]] = {}
    for j, parent in enumerate(parents):
        children.setdefault(parent, []).append(j)
    path, node = [], -1
    while True:
        probs = filtered_probs(logits[node + 1:node + 2], sampling)[0]
        for child in children.get(node, []):
            left = probs.sum()
            if torch.rand((), generator=generator, device=probs.device) * left < probs[tokens[child]]:
                path.append(child)
                node = child
                break
            probs = probs.clone()
            probs[tokens[child]] = 0.0
        else:  # no child accepted (or a leaf): the parent's sample from what is left
            return path, int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def tree_visibility(committed: int, parents: list[int]) -> torch.Tensor:
    """[fed, fed] bool for `committed` fed committed tokens (token-causal) followed by drafts with these parents
    (indices among the drafts, -1: none): a draft sees every fed committed token, its ancestors and itself."""
    width = committed + len(parents)
    visible = torch.zeros(width, width, dtype=torch.bool)
    visible[:committed, :committed] = torch.ones(committed, committed, dtype=torch.bool).tril()
    for j, parent in enumerate(parents):
        row = committed + j
        visible[row] = visible[committed + parent] if parent >= 0 else visible[committed - 1]
        visible[row, :committed] = True
        visible[row, row] = True
    return visible
