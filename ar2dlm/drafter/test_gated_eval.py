"""Draft acceptance: the rollout is the parent's greedy continuation, and the metric counts what a verify decoder
fed [clean prefix | mask block] would accept."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from ar2dlm.drafter.gated import GatedDrafterLM
from ar2dlm.drafter.gated_eval import DraftProbe, anchors_of, build_probes, draft_acceptance, greedy_rollout
from ar2dlm.testing import tiny_model, tiny_tokenizer

BLOCK = 4


def setup(seed=0, sharpen=20.0):
    """Sharpened, a random model has clear greedy choices; unsharpened, its argmax follows small input changes."""
    tok = tiny_tokenizer()
    parent = tiny_model("llama", vocab_size=len(tok), seed=seed, tie_word_embeddings=False)
    with torch.no_grad():
        parent.model.norm.weight.mul_(sharpen)
    drafter = GatedDrafterLM.from_base(copy.deepcopy(parent), tok, block_size=BLOCK, base_model="tiny", rank=8,
                                       alpha=16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in drafter.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    clean = torch.randint(0, 290, (2, 16), generator=g)
    return parent.eval(), drafter.eval(), clean


@torch.no_grad()
def parent_greedy(parent, prefix: torch.Tensor, n: int) -> list[int]:
    seq = prefix.clone()
    for _ in range(n):
        seq = torch.cat([seq, parent(seq[None]).logits[0, -1].argmax()[None]])
    return seq[len(prefix):].tolist()


@torch.no_grad()
def slow_drafts(drafter, prefix: torch.Tensor) -> list[int]:
    """What a verify forward of [prefix | B masks] drafts: the mask slot at p+k-1 predicts token p+k."""
    mask_id = drafter.config.mask_token_id
    fed = torch.cat([prefix, torch.full((BLOCK,), mask_id)])[None]
    n = fed.shape[1]
    q, kv = torch.arange(n)[:, None], torch.arange(n)[None, :]
    mask = ((kv <= q) | (q >= len(prefix)))[None, None]
    logits, _ = drafter(fed, attention_mask=mask)
    return logits[0, len(prefix):len(prefix) + BLOCK - 1].argmax(-1).tolist()


def test_rollout_is_the_parents_greedy_continuation_of_every_block():
    parent, drafter, clean = setup(sharpen=1.0)  # sensitive: a stray look at the text inside a block shows
    stream = greedy_rollout(drafter, clean, BLOCK)
    assert torch.equal(stream[:, :BLOCK], clean[:, :BLOCK])  # block 0 has no prefix to continue
    for row in range(2):
        for p in range(BLOCK, 16, BLOCK):
            assert stream[row, p:p + BLOCK].tolist() == parent_greedy(parent, clean[row, :p], BLOCK), (row, p)


def test_anchors_are_whole_maskable_blocks_after_the_first():
    maskable = torch.zeros(2, 14, dtype=torch.bool)
    maskable[0, 3:14] = True
    maskable[1, :9] = True
    got = anchors_of(maskable, BLOCK)
    assert got[0].nonzero().flatten().tolist() == [4, 8]  # block 12-13 is partial
    assert got[1].nonzero().flatten().tolist() == [4]  # block 0 has no prefix, block 8 runs into padding


def test_acceptance_counts_what_verify_would_accept():
    parent, drafter, clean = setup()
    anchors = torch.zeros_like(clean, dtype=torch.bool)
    anchors[:, [4, 8, 12]] = True
    drafts = {(r, p): slow_drafts(drafter, clean[r, :p]) for r in range(2) for p in (4, 8, 12)}
    # targets equal to the drafts, then broken: (0, 4) at +2 (accepts 1), (1, 8) at +1 (accepts 0)
    greedy = clean.clone()
    for (r, p), d in drafts.items():
        greedy[r, p + 1:p + BLOCK] = torch.tensor(d)
    greedy[0, 4 + 2] += 1
    greedy[1, 8 + 1] += 1
    probe = DraftProbe(clean, torch.tensor([16, 16]), anchors, greedy)
    stats = draft_acceptance(drafter, [probe])
    assert stats["draft_anchors"] == 6
    assert abs(stats["draft_acc_1"] - 5 / 6) < 1e-9
    assert abs(stats["draft_acc_2"] - 5 / 6) < 1e-9
    assert abs(stats["draft_acc_3"] - 1.0) < 1e-9
    assert abs(stats["draft_accepted"] - (3 * 4 + 1 + 0) / 6) < 1e-9


def test_probes_from_batches_use_the_parent_rollout():
    parent, drafter, clean = setup()
    maskable = torch.ones_like(clean, dtype=torch.bool)
    maskable[1, 10:] = False
    lengths = torch.tensor([16, 10])
    (probe,) = build_probes(drafter, [SimpleNamespace(input_ids=clean, maskable=maskable, lengths=lengths)])
    assert probe.anchors[0].nonzero().flatten().tolist() == [4, 8, 12]
    assert probe.anchors[1].nonzero().flatten().tolist() == [4]
    assert probe.greedy[0, 9:12].tolist() == parent_greedy(parent, clean[0, :8], 4)[1:]
    stats = draft_acceptance(drafter, [probe])
    assert stats["draft_anchors"] == 4 and 0 <= stats["draft_accepted"] <= 3


# Each layout has its own shapes; a recompile with dynamic shapes hits a torch CPU codegen error in the flex
# template (torch 2.13: cur_kvSplitSize0 undeclared), so every shape compiles statically here.
@torch._dynamo.config.patch(automatic_dynamic_shapes=False)
def test_rollout_and_acceptance_under_flex_attention_equal_sdpa():
    """The flex backend (the CUDA default) needs BlockMasks for the rollout's block-causal passes too."""
    from ar2dlm.model.test_attention import _compiler_errors

    _, drafter, _ = setup(sharpen=1.0)
    clean = torch.randint(0, 290, (2, 64), generator=torch.Generator().manual_seed(3))  # 2L = 128, see test_attention
    probe = DraftProbe(clean, torch.tensor([64, 64]), torch.ones_like(clean, dtype=torch.bool), clean)
    probe.anchors[:, 1:] = torch.arange(1, 64) % BLOCK == 0
    probe.anchors[:, 0] = False
    want = greedy_rollout(drafter, clean, BLOCK), draft_acceptance(drafter, [probe])
    drafter.set_attention_backend("flex")
    try:
        got = greedy_rollout(drafter, clean, BLOCK), draft_acceptance(drafter, [probe])
    except _compiler_errors() as e:
        pytest.skip(f"transformers' flex_attention path cannot run here: {type(e).__name__}: {e}")
    finally:
        drafter.set_attention_backend("sdpa")
    assert torch.equal(got[0], want[0])
    assert got[1] == want[1]
