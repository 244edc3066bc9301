"""The distillation loss: cross-entropy plus the sharpened entropy of the masked positions already predicted right."""

import torch

from ar2dlm.distillation.loss import DistillObjective, sharpened_entropy
from ar2dlm.model.dlm import BlockDiffusionLM
from ar2dlm.testing import tiny_model, tiny_tokenizer


def test_entropy_term_only_on_correct_predictions():
    tok = tiny_tokenizer()
    dlm = BlockDiffusionLM.from_base(tiny_model("llama", seed=2, vocab_size=len(tok)), tok, block_size=4)
    torch.manual_seed(0)
    clean = torch.randint(3, len(tok) - 1, (2, 16))
    masked = torch.zeros(2, 16, dtype=torch.bool)
    masked[:, 5:] = True
    noisy = torch.where(masked, dlm.config.mask_token_id, clean)
    logits, targets = dlm.diffusion_logits(noisy, clean, masked)
    right = logits.argmax(-1) == targets
    # make some predictions right: use the model's own argmax as the target for half the rows' positions
    clean2 = clean.clone()
    clean2[masked] = torch.where(torch.arange(targets.numel()) % 2 == 0, logits.argmax(-1), targets)
    loss, correct, ce, ent = DistillObjective(dlm, entropy_weight=2.0, entropy_temperature=0.5)(noisy, clean2, masked)
    logits2, targets2 = dlm.diffusion_logits(noisy, clean2, masked)
    right = logits2.argmax(-1) == targets2
    assert int(correct) == int(right.sum()) > 0
    expect_ent = sharpened_entropy(logits2[right], 0.5).sum()
    torch.testing.assert_close(ent, expect_ent)
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(logits2, targets2, reduction="sum"))
    torch.testing.assert_close(loss, ce + 2.0 * expect_ent)
    # the entropy term pushes toward sharper distributions: its gradient is non-zero
    ent.backward()
    assert dlm.backbone.lm_head.weight.grad.abs().sum() > 0
    # sharpened entropy is the entropy of softmax(logits / T)
    x = torch.tensor([[2.0, 0.0, -1.0]])
    p = (x / 0.5).softmax(-1)
    torch.testing.assert_close(sharpened_entropy(x, 0.5), -(p * p.log()).sum(-1))
