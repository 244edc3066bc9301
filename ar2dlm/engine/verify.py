"""The lossless `verify` policy: the model's mask positions draft, its clean positions verify, in the same forward.

A sequence keeps its committed tokens (the prompt and everything accepted) and a list of drafts for the positions
after them. One forward feeds, at consecutive positions:

* clean, token-causal: the last committed token (the one not in the cache yet) and the drafts. Their logits are the
  AR model's own next-token logits: with a gated drafter (`ar2dlm.drafter.gated`) clean positions run the unchanged
  parent, bit for bit; with a full dLM they are that model's AR head, *not* its parent;
* `draft_len + 1` mask tokens right after them, which see the clean positions and each other. With token shift the
  last clean position predicts the first mask position's token (the AR model's own next token) and every mask
  position predicts the one after it; the last mask's prediction is not read (a drafter trained on blocks of B masks
  drafts B - 1 tokens after the AR model's own one, so `draft_len` defaults to the block size - 1).

The clean logits check the drafts: the longest prefix of drafts equal to the AR model's choice is accepted, plus
the AR model's token after it (the correction, or a bonus when all drafts were right), so each forward commits
between 1 and drafts + 1 tokens and the output is exactly the AR model's. When every draft was accepted, the mask
predictions (which were conditioned on those same drafts) become the next drafts; otherwise the next forward has
none and only drafts. Cache slots of rejected drafts and of the mask positions are simply rewritten by the next
forward (the cache counts as valid up to the last committed token only).

With `every_length` (TiDAR-style) the forward feeds one mask block per possible acceptance length 0..drafts instead,
each at the positions it drafts and seeing only the clean prefix it assumes accepted; the block matching the outcome
gives the next drafts, so a forward after a rejected draft still has drafts to check. With a `chooser`
(`--draft-len auto`, engine/draft_length.py) the draft length is chosen anew before every forward; a length of 0 is
a plain AR forward (no mask block), for hardware where drafting does not pay.

With a feature drafter (`feature_window` > 0, drafter/feature.py) the forward feeds no mask block at all: it is the
parent's plain forward over the clean positions, and it also yields the parent's hidden states there; the engine
hands those of the committed positions to the sequence (`apply(..., features=...)`, the last `feature_window` kept)
and the drafter drafts the next block from them in a call of its own after the forward (`set_drafts`), whatever was
accepted.

With `lookup`, a forward the model has no drafts for (the first one, or after a rejection without `every_length`)
checks prompt-lookup drafts instead (engine/lookup.py), when the sequence's last tokens occurred before. A feature
drafter always has drafts, so there lookup comes first: wherever the last tokens occurred before, the forward checks
the lookup drafts and the drafter's call for it is skipped (answers that restate the prompt or repeat themselves are
where lookup drafts run long and the drafter's short window sees least).

With `tree` (a feature drafter) the drafter's drafts are a tree of `draft_len` drafts, its likeliest
continuations, instead of one chain, and the forward checks them all (engine/draft_tree.py).

Greedy: accept while draft == argmax. Sampling (temperature > 0): speculative sampling, accept draft x with
probability min(1, p(x) / q(x)) where q is the draft distribution it was sampled from and p the AR model's, and on
rejection sample from max(0, p - q) normalised; the committed tokens are then distributed exactly as the AR model's
own samples (Leviathan et al., 2023; Chen et al., 2023).
"""

from __future__ import annotations

import torch

from ar2dlm.engine.draft_tree import DraftTree, grow_tree, layout, sampled_walk, tree_visibility, walk
from ar2dlm.engine.lookup import lookup_drafts
from ar2dlm.engine.plan import Plan
from ar2dlm.engine.sampling import Sampling, filtered_probs
from ar2dlm.errors import Ar2dlmError


class VerifyState:
    """One sequence decoded by draft-and-verify; the same interface as `BlockState` for the scheduler and runner."""

    def __init__(self, prompt_ids: list[int], max_new_tokens: int, draft_len: int, mask_id: int, token_shift: bool,
                 every_length: bool = False, chooser=None, lookup: bool = False, feature_window: int = 0,
                 tree: bool = False):
        if not token_shift:
            raise Ar2dlmError("the verify policy needs a model with token shift (its clean positions predict the "
                              "next token, as an AR model does)")
        if draft_len < 0 or (draft_len == 0 and (chooser is not None or lookup or feature_window)):
            raise Ar2dlmError(f"draft length must be >= 1, got {draft_len}")  # 0: the verifier alone (AR)
        if feature_window and every_length:
            raise Ar2dlmError("drafts for every acceptance length (+all) are for a gated drafter: a feature drafter "
                              "drafts after every forward, whatever was accepted")
        if tree and not feature_window:
            raise Ar2dlmError("tree drafts are a feature drafter's (its per-position distributions make the tree); a "
                              "mask-block drafter checks one chain")
        self.feature_window = feature_window
        self.tree = tree
        self._tree: DraftTree | None = None  # the drafter's drafts as a tree (their tokens are also `drafts`)
        self._fed_tree: tuple[list[int], list[int]] | None = None  # the last plan's tree drafts: (indices, parents)
        self.featured = 0  # positions whose parent features the context has taken (a feature drafter)
        self.context: torch.Tensor | None = None  # a feature drafter's input: parent features of the last positions
        self.prompt_len = len(prompt_ids)
        self.limit = self.prompt_len + max_new_tokens
        self.draft_len, self.mask_id, self.every_length = draft_len, mask_id, every_length
        # draft_len auto: a DraftLengthChooser picks the length of every forward, at most `draft_len`
        self.chooser, self.max_draft_len = chooser, draft_len
        self._fed_blocks: list[tuple[int, int]] = []  # the mask blocks of the last plan: (accepted, drafts made)
        self.toks = list(prompt_ids)  # committed tokens; toks[-1] is not in the cache yet
        self.drafts: list[int] = []
        self.draft_probs: torch.Tensor | None = None  # [len(drafts), V] distributions the drafts were sampled from
        self.lookup = lookup
        self.looked_up = False  # the current drafts come from prompt lookup, not the model
        self._looked_for = False  # this forward looked for lookup drafts
        self.cached = 0
        self.nfe = 0
        self.accepted_drafts = 0  # drafts accepted over the whole sequence (for acceptance statistics)
        self.offered_drafts = 0

    @property
    def decoded(self) -> int:
        return len(self.toks)

    def _fed_drafts(self) -> list[int]:
        """The drafts this forward checks: at most the draft length, none at or past the length limit."""
        most = len(self.drafts) if self.looked_up else self.draft_len  # lookup drafts come at the length wanted
        return self.drafts[:max(min(most, self.limit - len(self.toks) - 1), 0)]

    @property
    def slot_limit(self) -> int:
        """Cache slots this sequence may write: its length limit, and with drafts for every acceptance length the
        mask blocks past it (at most `draft_len + 1` blocks of `draft_len + 1` masks); tree drafts sit in the
        slots after the committed tokens, at most `draft_len` of them."""
        if self.every_length:
            return self.limit + (self.max_draft_len + 1) ** 2
        return self.limit + self.max_draft_len if self.tree else self.limit

    def _blocks(self, n: int, drafts: list[int]) -> list[tuple[int, int]]:
        """(accepted drafts assumed, drafts it makes) for each mask block this forward feeds: the block after all
        drafts, or with `every_length` one per acceptance length 0..len(drafts). A block assuming `a` accepted
        drafts starts at position n + a, a mask standing for the AR model's token there, and drafts the positions
        after it up to the length limit; one more mask is fed so the block is as long as in training."""
        lengths = range(len(drafts) + 1) if self.every_length else [len(drafts)]
        return [(a, min(self.draft_len, self.limit - (n + a) - 1)) for a in lengths]

    def plan(self) -> Plan:
        """Feed [uncached committed | drafts | mask blocks]; read the logits of every clean position from the last
        committed token on, and of the mask positions that draft a position before the length limit."""
        if self.looked_up:  # lookup drafts of a plan that never ran (a scheduler may plan a request and leave it
            self._take_drafts()  # out of the forward): look again
        lookup_len = self.draft_len if self.lookup else 0
        if self.chooser is not None:
            self.draft_len, lookup_len = self.chooser.choose()
            if self.draft_len == 0:  # a plain forward: no mask block, and the model's drafts are not checked
                self._take_drafts()
        # a feature drafter's drafts always exist: lookup drafts, where found, come first (its call was skipped)
        self._looked_for = lookup_len > 0 and (not self.drafts or bool(self.feature_window))
        if self._looked_for:
            found = lookup_drafts(self.toks, lookup_len)
            if found or not self.feature_window:
                self._take_drafts(found, looked_up=bool(found))
        self._fed_tree = None
        if self._tree is not None:
            return self._tree_plan()
        n, drafts = len(self.toks), self._fed_drafts()
        start, clean_end = self.cached, n + len(drafts)
        self._fed_blocks = [] if self.feature_window else \
            [(a, made) for a, made in self._blocks(n, drafts) if made > 0]
        ids = self.toks[start:] + drafts
        logit_pos = list(range(n - 1, clean_end))
        if not self.every_length:  # one block after the clean positions, seeing all of them: visibility groups
            masks = self._fed_blocks[0][1] + 1 if self._fed_blocks else 0
            groups = list(range(start, clean_end)) + [clean_end] * masks
            logit_pos += list(range(clean_end, clean_end + masks - 1))
            return Plan(start, clean_end + masks, start, logit_pos, ids=ids + [self.mask_id] * masks, groups=groups)
        positions, slot = list(range(start, clean_end)), clean_end
        owner = [-1] * (clean_end - start)  # mask block of each fed slot (-1: clean)
        seen_upto = [p + 1 for p in positions]  # clean keys a fed slot reads lie below this position
        for b, (a, made) in enumerate(self._fed_blocks):
            positions += range(n + a, n + a + made + 1)
            owner += [b] * (made + 1)
            seen_upto += [n + a] * (made + 1)  # the prefix it assumes accepted
            logit_pos += range(slot, slot + made)
            slot += made + 1
        ids += [self.mask_id] * (slot - clean_end)
        return Plan(start, slot, start, logit_pos, ids=ids, positions=positions,
                    visible=_every_length_visibility(owner, positions, seen_upto))

    def _tree_plan(self) -> Plan:
        """Feed [uncached committed | tree drafts], each draft at the position of its depth seeing the committed
        tokens and its ancestors; read the logits of the last committed token and of every draft."""
        n, start, tree = len(self.toks), self.cached, self._tree
        fed = layout(tree, self.draft_len, self.limit - n - 1)
        index = {node: j for j, node in enumerate(fed)}
        parents = [index.get(tree.parents[node], -1) for node in fed]
        self._fed_tree = (fed, parents)
        committed = n - start
        return Plan(start, n + len(fed), start, list(range(n - 1, n + len(fed))),
                    ids=self.toks[start:] + [tree.tokens[node] for node in fed],
                    positions=list(range(start, n)) + [n - 1 + tree.depths[node] for node in fed],
                    visible=tree_visibility(committed, parents))

    def apply(self, plan: Plan, logits: torch.Tensor, policy: "VerifyPolicy", sampling: Sampling,
              generator: torch.Generator | None, features: torch.Tensor | None = None) -> tuple[int, int]:
        """Accept drafts against the clean logits (rows 0 .. len(drafts)), take the next drafts from the rows of
        the mask block that assumed exactly the accepted drafts (a feature drafter: keep the parent `features` of
        the fed positions now committed); returns the committed length before and after."""
        if self._fed_tree is not None:
            return self._apply_tree(plan, logits, features, sampling, generator)
        self.nfe += 1
        drafts, old = self._fed_drafts(), len(self.toks)
        q = self.draft_probs[:len(drafts)] if self.draft_probs is not None else None
        if self.looked_up and drafts and not sampling.greedy:  # a deterministic proposal: q is one-hot at each draft
            q = torch.nn.functional.one_hot(torch.tensor(drafts, device=logits.device), logits.shape[-1])
            q = q.to(logits.dtype)
        accepted, token = policy.accept(drafts, q, logits[:len(drafts) + 1], sampling, generator)
        self.offered_drafts += len(drafts)
        self.accepted_drafts += accepted
        if self.chooser is not None:
            self.chooser.record(len(drafts), accepted, model_drafts=bool(drafts) and not self.looked_up,
                                looked_up=self._looked_for, plain=self.draft_len == 0)
        if self.feature_window:  # fed slots from the cached length on; those up to the last accepted draft count
            self._keep_context(features, plan.fed_start, list(range(old - plan.fed_start + accepted)))
        self.toks += drafts[:accepted] + [token]
        self.cached = len(self.toks) - 1  # the new last token's K/V are not computed yet
        self._take_drafts()
        row = len(drafts) + 1
        for a, made in self._fed_blocks:
            if a == accepted:
                self._take_drafts(*policy.draft(logits[row:row + made], sampling, generator))
            row += made
        return old, len(self.toks)

    def _apply_tree(self, plan: Plan, logits: torch.Tensor, features: torch.Tensor | None, sampling: Sampling,
                    generator: torch.Generator | None) -> tuple[int, int]:
        """The parent's walk through the fed tree (greedy: its longest agreeing path; sampled: speculative sampling
        along it) and its token after the path. The cache stays valid up to where the path leaves the greedy chain
        (those drafts sit in their own slots)."""
        self.nfe += 1
        (fed, parents), tree, old = self._fed_tree, self._tree, len(self.toks)
        tokens = [tree.tokens[node] for node in fed]
        if sampling.greedy:
            choices = logits[:len(fed) + 1].argmax(-1).tolist()
            path = walk(tokens, parents, choices)
            token = choices[path[-1] + 1 if path else 0]
        else:
            path, token = sampled_walk(tokens, parents, logits, sampling, generator)
        self.offered_drafts += len(fed)
        self.accepted_drafts += len(path)
        if self.chooser is not None:  # a tree of D drafts priced as D drafts checked, at the tree's acceptance
            self.chooser.record(len(fed), len(path), model_drafts=True, looked_up=self._looked_for)
        on_chain = next((k for k, j in enumerate(path) if j != k), len(path))  # path[k] == k: chain draft k's slot
        committed = old - plan.fed_start
        self._keep_context(features, plan.fed_start, list(range(committed)) + [committed + j for j in path])
        self.toks += [tokens[j] for j in path] + [token]
        self.cached = old + on_chain
        self._take_drafts()
        self._fed_tree = None
        return old, len(self.toks)

    def _keep_context(self, features: torch.Tensor | None, fed_start: int, rows: list[int]) -> None:
        """Add the parent features of newly committed positions: the fed `rows` ([fed, F] row indices, in position
        order from `fed_start`) past those taken already (a tree's side branch is fed again after its forward)."""
        if features is None:
            raise Ar2dlmError("a feature drafter's verify forward came without the parent's features")
        rows = rows[max(self.featured - fed_start, 0):]
        self.featured += len(rows)
        new = features[rows]
        context = new if self.context is None else torch.cat([self.context, new])
        self.context = context[-self.feature_window:]

    @property
    def wants_drafts(self) -> bool:
        """A feature drafter drafts for this sequence after the forward: room is left, the last choice drafted, and
        the next forward will not check prompt-lookup drafts instead (they come first where found)."""
        if not (self.feature_window and self.draft_len > 0 and len(self.toks) + 1 < self.limit):
            return False
        return not (self._next_lookup_len() and lookup_drafts(self.toks, 1))

    def _next_lookup_len(self) -> int:
        """The prompt-lookup drafts the next forward looks for at most (0: none)."""
        if not self.lookup:
            return 0
        return self.chooser.choose().lookup if self.chooser is not None else self.draft_len

    def set_drafts(self, draft_logits: torch.Tensor, policy: "VerifyPolicy", sampling: Sampling,
                   generator: torch.Generator | None) -> None:
        """The feature drafter's logits [D, V] after the last committed token become the next drafts: a tree of
        `draft_len` drafts with `tree` (its likeliest, sampled decoding too), else a chain."""
        if self.tree:
            tree = grow_tree(draft_logits, self.max_draft_len)  # the next forward checks its best draft_len
            self._take_drafts(tree.tokens, tree=tree)
        else:
            self._take_drafts(*policy.draft(draft_logits, sampling, generator))

    def _take_drafts(self, drafts: list[int] = (), probs: torch.Tensor | None = None, looked_up: bool = False,
                     tree: DraftTree | None = None) -> None:
        """The drafts the next forward checks (none by default): their tokens, the distributions they were sampled
        from (None: greedy or looked up), whether prompt lookup found them, and the tree they form (None: a chain)."""
        self.drafts, self.draft_probs, self.looked_up, self._tree = list(drafts), probs, looked_up, tree

    def release(self) -> None:
        self._take_drafts()
        self.context, self._fed_tree = None, None


def _every_length_visibility(owner: list[int], positions: list[int], seen_upto: list[int]) -> torch.Tensor:
    """Clean slots are token-causal; a mask block sees the clean slots before its own first position and itself,
    both ways."""
    owner_t, pos_t = torch.tensor(owner), torch.tensor(positions)
    clean = owner_t < 0
    visible = clean[None, :] & (pos_t[None, :] < torch.tensor(seen_upto)[:, None])
    return visible | ((owner_t[None, :] == owner_t[:, None]) & ~clean[:, None])


class VerifyPolicy:
    """Acceptance and drafting rules of the verify policy (see the module docstring)."""

    name = "verify"
    leftmost_only = False

    def accept(self, drafts: list[int], draft_probs: torch.Tensor | None, target_logits: torch.Tensor,
               sampling: Sampling, generator: torch.Generator | None) -> tuple[int, int]:
        """(number of drafts accepted, the AR model's token after them) for target logits [len(drafts) + 1, V]."""
        if sampling.greedy:
            choice = target_logits.argmax(-1).tolist()
            accepted = 0
            while accepted < len(drafts) and drafts[accepted] == choice[accepted]:
                accepted += 1
            return accepted, choice[accepted]
        p = filtered_probs(target_logits, sampling)
        for i, x in enumerate(drafts):
            ratio = p[i, x] / draft_probs[i, x].clamp_min(1e-30)
            if torch.rand((), generator=generator, device=p.device) < ratio.clamp(max=1.0):
                continue
            residual = (p[i] - draft_probs[i]).clamp_min(0.0)
            total = residual.sum()
            dist = residual / total if total > 0 else p[i]
            return i, int(torch.multinomial(dist, 1, generator=generator))
        return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=generator))

    def draft(self, mask_logits: torch.Tensor, sampling: Sampling,
              generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        """Drafts from the mask positions' logits [D, V]: greedy argmax, or sampled with their distributions."""
        if sampling.greedy:
            return mask_logits.argmax(-1).tolist(), None
        q = filtered_probs(mask_logits, sampling)
        return torch.multinomial(q, 1, generator=generator)[:, 0].tolist(), q
