"""The drafter objective: the no-grad clean half gives the loss and gradients of the all-gradient layout, only
in-block mask positions are scored, and training leaves the clean positions exactly the parent's."""

from __future__ import annotations

import copy

import pytest
import torch

from ar2dlm.drafter.gated import GatedDrafterLM
from ar2dlm.drafter.gated_objective import DrafterObjective, drafter_scored, full_blocks
from ar2dlm.testing import tiny_model, tiny_tokenizer
from ar2dlm.training.optim import build_optimizer

BLOCK = 4


def make_drafter(seed=0):
    tok = tiny_tokenizer()
    parent = tiny_model("llama", vocab_size=len(tok), seed=seed)
    with torch.no_grad():  # a random model's logits are nearly flat; sharpened, there is something to learn
        parent.model.norm.weight.mul_(20)
    drafter = GatedDrafterLM.from_base(copy.deepcopy(parent), tok, block_size=BLOCK, base_model="tiny", rank=8,
                                       alpha=16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a trained-looking adapter: B != 0, so every LoRA factor gets a gradient
        for p in drafter.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return parent.eval(), drafter


def batch(drafter, full: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 290, (3, 16), generator=g)
    lengths = torch.tensor([16, 11, 6])
    maskable = torch.arange(16)[None, :] < lengths[:, None]
    maskable[:, 0] = False
    masked = maskable if full else maskable & (torch.rand(3, 16, generator=g) < 0.5)
    noisy = full_blocks(masked, clean, drafter.config.mask_token_id)
    return noisy, clean, drafter_scored(masked, BLOCK), lengths


def loss_and_grads(drafter, target, split, args):
    drafter.zero_grad()
    loss, correct = DrafterObjective(drafter, target, split=split)(*args)
    loss.backward()
    return loss.detach(), correct, {n: p.grad.clone() for n, p in drafter.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("target", ("text", "argmax", "distribution"))
@pytest.mark.parametrize("full", (True, False))
def test_no_grad_clean_half_matches_the_all_gradient_layout(target, full):
    _, drafter = make_drafter()
    drafter.train()
    args = batch(drafter, full)
    loss, correct, grads = loss_and_grads(drafter, target, True, args)
    ref_loss, ref_correct, ref_grads = loss_and_grads(drafter, target, False, args)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert correct == ref_correct
    assert grads.keys() == ref_grads.keys() and len(grads) == 1 + 2 * 2 * 7
    for name, g in ref_grads.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_gradient_checkpointing_takes_the_whole_layout_with_the_same_gradients():
    _, drafter = make_drafter()
    drafter.train()
    args = batch(drafter, True)
    loss, _, grads = loss_and_grads(drafter, "argmax", True, args)
    drafter.enable_gradient_checkpointing()
    loss_gc, _, grads_gc = loss_and_grads(drafter, "argmax", True, args)
    torch.testing.assert_close(loss_gc, loss, atol=1e-5, rtol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(grads_gc[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_scored_positions_exclude_block_starts():
    masked = torch.ones(2, 10, dtype=torch.bool)
    scored = drafter_scored(masked, BLOCK)
    assert scored[0].nonzero().flatten().tolist() == [1, 2, 3, 5, 6, 7, 9]
    _, drafter = make_drafter()
    noisy, clean, _, lengths = batch(drafter, True)
    with pytest.raises(ValueError, match="first position"):
        DrafterObjective(drafter)(noisy, clean, torch.ones(3, 16, dtype=torch.bool), lengths)


def test_argmax_target_is_the_parents_next_token():
    """At full masking the argmax target of the first in-block draft is the parent's greedy token there."""
    parent, drafter = make_drafter()
    noisy, clean, scored, lengths = batch(drafter, True)
    objective = DrafterObjective(drafter, "argmax")
    with torch.no_grad():
        clean_hidden, _ = drafter.clean_pass(clean)
        rows, cols = scored.nonzero(as_tuple=True)
        expected = parent(clean).logits[rows, cols - 1].argmax(-1)
        got = drafter.logits(clean_hidden[rows, cols - 1]).argmax(-1)
    assert torch.equal(got, expected)
    loss, correct = objective(noisy, clean, scored, lengths)
    assert 0 <= int(correct) <= int(scored.sum()) and loss > 0


def test_training_steps_learn_and_leave_the_clean_positions_the_parents():
    parent, drafter = make_drafter()
    drafter.train()
    objective = DrafterObjective(drafter, "argmax")
    optimizer = build_optimizer(objective, 1e-2, 0.0)
    args = batch(drafter, True, seed=1)
    before = {n: p.detach().clone() for n, p in drafter.named_parameters() if p.requires_grad}
    losses = []
    for _ in range(8):
        loss, _ = objective(*args)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(not torch.equal(p, before[n]) for n, p in drafter.named_parameters() if p.requires_grad)
    noisy, clean, _, _ = args
    mask_id = drafter.config.mask_token_id
    fed = torch.cat([clean[:, :9], torch.full((3, BLOCK), mask_id)], dim=1)
    stand_in = torch.where(fed == mask_id, torch.zeros_like(fed), fed)
    total = fed.shape[1]
    q, kv = torch.arange(total)[:, None], torch.arange(total)[None, :]
    mask = ((kv <= q) | (q >= 9))[None, None].expand(3, -1, -1, -1)
    with torch.no_grad():
        logits, _ = drafter.eval()(fed, attention_mask=mask)
        ref = parent(stand_in, attention_mask=mask).logits
    vocab = parent.config.vocab_size
    assert torch.equal(logits[:, :9, :vocab], ref[:, :9])
