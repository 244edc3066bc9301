"""The gated drafter: clean positions are the parent exactly (logits, hidden states, K/V), mask positions are not;
the clean stream is token-causal; save/load keeps the gate (never merged)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import DynamicCache

from ar2dlm.drafter.gated import DRAFTER_WEIGHTS_FILE, GatedDrafterLM, GatedLoRALinear
from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.dlm import BlockDiffusionLM, DLMConfig
from ar2dlm.model.loading import load_base
from ar2dlm.model.open import load_dlm
from ar2dlm.testing import tiny_base, tiny_model, tiny_tokenizer

FAMILIES = ("llama", "qwen3")
STAND_IN = 5  # what the parent is fed where the drafter has a mask token (the parent has no mask row)


def randomize_adapter(drafter: GatedDrafterLM, seed: int = 0, scale: float = 0.1) -> None:
    """Non-zero LoRA factors and mask row, as after training, so the adapter really changes mask positions."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in drafter.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def parent_and_drafter(family="llama", block_size=4):
    tok = tiny_tokenizer()
    parent = tiny_model(family, vocab_size=len(tok))
    drafter = GatedDrafterLM.from_base(copy.deepcopy(parent), tok, block_size=block_size, base_model="tiny", rank=8,
                                       alpha=16)
    randomize_adapter(drafter)
    return parent.eval(), drafter.eval(), tok


def ids(n, seq_len, vocab, seed=0):
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def verify_mask(n_past: int, n_clean: int, n_mask: int) -> torch.Tensor:
    """A verify-style forward: clean slots token-causal, the mask block sees everything clean and itself."""
    total = n_past + n_clean + n_mask
    q = torch.arange(n_past, total)[:, None]
    kv = torch.arange(total)[None, :]
    q_clean = q < n_past + n_clean
    return ((kv <= q) & q_clean | ~q_clean)[None, None]


def stand_in(fed: torch.Tensor, mask_id: int) -> torch.Tensor:
    return torch.where(fed == mask_id, torch.full_like(fed, STAND_IN), fed)


@pytest.mark.parametrize("family", FAMILIES)
def test_clean_positions_are_the_parent_bit_for_bit(family):
    """Same forward (clean prefix + a mask block), same shapes: at every clean position the drafter's logits,
    hidden states of every layer and K/V are the parent's, exactly; at mask positions they are not."""
    parent, drafter, _ = parent_and_drafter(family)
    vocab, mask_id = parent.config.vocab_size, drafter.config.mask_token_id
    fed = torch.cat([ids(2, 13, vocab), torch.full((2, 4), mask_id)], dim=1)
    mask = verify_mask(0, 13, 4).expand(2, -1, -1, -1)
    caches = DynamicCache(), DynamicCache()
    with torch.no_grad():
        logits, out = drafter(fed, attention_mask=mask, past_key_values=caches[0], use_cache=True,
                              output_hidden_states=True)
        ref = parent(stand_in(fed, mask_id), attention_mask=mask, past_key_values=caches[1], use_cache=True,
                     output_hidden_states=True)
    assert torch.equal(logits[:, :13, :vocab], ref.logits[:, :13])
    for h, h_ref in zip(out.hidden_states, ref.hidden_states):
        assert torch.equal(h[:, :13], h_ref[:, :13])
    for mine, theirs in zip(caches[0].layers, caches[1].layers):
        assert torch.equal(mine.keys[:, :, :13], theirs.keys[:, :, :13])
        assert torch.equal(mine.values[:, :, :13], theirs.values[:, :, :13])
    assert not torch.allclose(logits[:, 13:, :vocab], ref.logits[:, 13:], atol=1e-3)  # the gate does open


def test_clean_only_forward_is_the_parent_and_skips_the_adapter():
    parent, drafter, _ = parent_and_drafter()
    x = ids(3, 11, parent.config.vocab_size, seed=1)
    assert drafter.gate_for(x) is None
    with torch.no_grad():
        logits, _ = drafter(x)
        assert torch.equal(logits[..., :parent.config.vocab_size], parent(x).logits)


def test_other_widths_agree_to_rounding_as_the_parent_does():
    """Against the parent run on the clean tokens alone, the clean logits agree to float rounding: the kernels
    of a wider forward sum in another order, which changes the parent's own logits by as much."""
    parent, drafter, _ = parent_and_drafter()
    vocab, mask_id = parent.config.vocab_size, drafter.config.mask_token_id
    clean = ids(2, 13, vocab, seed=2)
    fed = torch.cat([clean, torch.full((2, 4), mask_id)], dim=1)
    with torch.no_grad():
        logits, _ = drafter(fed, attention_mask=verify_mask(0, 13, 4).expand(2, -1, -1, -1))
        alone = parent(clean).logits
    torch.testing.assert_close(logits[:, :13, :vocab], alone, atol=1e-5, rtol=1e-5)


def test_kv_cached_decoding_forward_mixes_clean_and_mask_positions():
    """Prefill, then one forward of [2 clean tokens | 4 masks] on the cache: the new clean positions and their
    K/V are the parent's (same calls), the mask positions draft with the adapter."""
    parent, drafter, _ = parent_and_drafter()
    vocab, mask_id = parent.config.vocab_size, drafter.config.mask_token_id
    prompt = ids(1, 9, vocab, seed=3)
    step = torch.cat([ids(1, 2, vocab, seed=4), torch.full((1, 4), mask_id)], dim=1)
    caches = DynamicCache(), DynamicCache()
    pos = torch.arange(9, 15)[None]
    with torch.no_grad():
        drafter(prompt, past_key_values=caches[0], use_cache=True)
        parent(prompt, past_key_values=caches[1], use_cache=True)
        logits, _ = drafter(step, attention_mask=verify_mask(9, 2, 4), position_ids=pos, past_key_values=caches[0],
                            use_cache=True)
        ref = parent(stand_in(step, mask_id), attention_mask=verify_mask(9, 2, 4), position_ids=pos,
                     past_key_values=caches[1], use_cache=True).logits
    assert torch.equal(logits[:, :2, :vocab], ref[:, :2])
    for mine, theirs in zip(caches[0].layers, caches[1].layers):
        assert torch.equal(mine.keys[:, :, :11], theirs.keys[:, :, :11])
        assert torch.equal(mine.values[:, :, :11], theirs.values[:, :, :11])
        assert not torch.allclose(mine.keys[:, :, 11:], theirs.keys[:, :, 11:], atol=1e-4)


def test_training_layout_clean_stream_is_token_causal_and_the_parent():
    parent, drafter, _ = parent_and_drafter()
    vocab, mask_id = parent.config.vocab_size, drafter.config.mask_token_id
    clean = ids(2, 12, vocab, seed=5)
    noisy = clean.clone()
    noisy[:, 4:] = mask_id
    changed = clean.clone()
    changed[:, 6] = (changed[:, 6] + 1) % vocab  # a later token inside block 1
    with torch.no_grad():
        hidden = drafter.training_hidden(noisy, clean)[:, 12:]
        hidden_changed = drafter.training_hidden(noisy, changed)[:, 12:]
        torch.testing.assert_close(hidden, parent.model(clean).last_hidden_state, atol=1e-5, rtol=1e-5)
    assert torch.equal(hidden[:, :6], hidden_changed[:, :6])  # block-causal would let 4 and 5 see position 6
    assert not torch.allclose(hidden[:, 6:], hidden_changed[:, 6:])


def test_split_passes_equal_the_whole_layout():
    _, drafter, _ = parent_and_drafter()
    mask_id = drafter.config.mask_token_id
    clean = ids(3, 16, 290, seed=6)
    noisy = clean.clone()
    noisy[torch.rand(3, 16, generator=torch.Generator().manual_seed(0)) < 0.6] = mask_id
    lengths = torch.tensor([16, 11, 5])
    with torch.no_grad():
        whole = drafter.training_hidden(noisy, clean, lengths)
        split = drafter.split_hidden(noisy, clean, lengths)
    valid = torch.cat([torch.arange(16) < lengths[:, None]] * 2, dim=1)
    torch.testing.assert_close(split[valid], whole[valid], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_recomputes_with_the_forward_gate():
    """The backward replay runs after the forward restored the gate; it must still see the forward's gate."""
    _, drafter, _ = parent_and_drafter()
    mask_id = drafter.config.mask_token_id
    clean = ids(2, 12, 290, seed=7)
    noisy = clean.clone()
    noisy[:, 4:] = mask_id
    drafter.train()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            drafter.enable_gradient_checkpointing()
        drafter.zero_grad()
        drafter.training_hidden(noisy, clean)[:, :12].square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in drafter.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_only_the_adapter_trains_and_token_shift_is_required():
    parent, drafter, tok = parent_and_drafter()
    trainable = {n for n, p in drafter.named_parameters() if p.requires_grad}
    assert trainable == {"mask_embedding"} | {n for n in trainable if n.endswith(("lora_A", "lora_B"))}
    assert sum(isinstance(m, GatedLoRALinear) for m in drafter.modules()) == 2 * 7
    assert drafter.config.drafter and drafter.config.clean_attention == "token_causal"
    with pytest.raises(Ar2dlmError, match="token shift"):
        GatedDrafterLM.from_base(copy.deepcopy(parent), tok, token_shift=False)
    with pytest.raises(Ar2dlmError, match="clean_attention"):
        DLMConfig(clean_attention="bidirectional")


def test_save_load_round_trip_keeps_the_gate(tmp_path):
    folder = tiny_base(tmp_path)
    backbone, tok = load_base(str(folder))
    drafter = GatedDrafterLM.from_base(backbone, tok, block_size=4, rank=8, alpha=16).eval()
    randomize_adapter(drafter, seed=1)
    out = tmp_path / "drafter"
    with pytest.raises(Ar2dlmError, match="parent"):
        drafter.save_pretrained(out, tok)
    drafter.save_pretrained(out, tok, base_model=str(folder))
    assert {p.name for p in out.iterdir() if p.suffix in (".safetensors", ".bin")} == {DRAFTER_WEIGHTS_FILE}
    assert (out / DRAFTER_WEIGHTS_FILE).stat().st_size < (folder / "model.safetensors").stat().st_size / 4
    meta = json.loads((out / "dlm_config.json").read_text())
    assert meta["base_model"] == str(folder) and meta["dlm"]["drafter"] is True
    assert meta["dlm"]["clean_attention"] == "token_causal" and meta["drafter"]["rank"] == 8

    with pytest.raises(Ar2dlmError, match="load_dlm"):  # the dLM class loads full and LoRA dLMs only
        BlockDiffusionLM.from_pretrained(out)
    loaded, loaded_tok = load_dlm(out)
    assert isinstance(loaded, GatedDrafterLM) and loaded.config == drafter.config
    assert len(loaded_tok) == len(tok)
    parent, _ = load_base(str(folder))
    vocab = parent.config.vocab_size
    q_proj = loaded.backbone.model.layers[0].self_attn.q_proj
    assert torch.equal(q_proj.base.weight, parent.model.layers[0].self_attn.q_proj.weight)  # not merged
    fed = torch.cat([ids(2, 9, vocab, seed=8), torch.full((2, 4), drafter.config.mask_token_id)], dim=1)
    mask = verify_mask(0, 9, 4).expand(2, -1, -1, -1)
    with torch.no_grad():
        want, _ = drafter(fed, attention_mask=mask)
        got, _ = loaded.eval()(fed, attention_mask=mask)
        ref = parent(stand_in(fed, drafter.config.mask_token_id), attention_mask=mask).logits
    assert torch.equal(got, want)
    assert torch.equal(got[:, :9, :vocab], ref[:, :9])


# Each layout has its own shapes; a recompile with dynamic shapes hits a torch CPU codegen error in the flex
# template (torch 2.13: cur_kvSplitSize0 undeclared), so every shape compiles statically here.
@torch._dynamo.config.patch(automatic_dynamic_shapes=False)
def test_flex_backend_equals_sdpa():
    """Both drafter layouts through Hugging Face's flex_attention path (the CUDA default) equal the SDPA path:
    the whole [noisy | clean] layout and the noisy half on top of the clean cache (2L = 128: see test_attention)."""
    from ar2dlm.model.test_attention import _compiler_errors

    _, drafter, _ = parent_and_drafter()
    seq_len = 64
    clean = ids(2, seq_len, 290, seed=9)
    noisy = clean.clone()
    noisy[:, 8:] = drafter.config.mask_token_id
    lengths = torch.tensor([seq_len, seq_len - 7])
    with torch.no_grad():
        want = drafter.training_hidden(noisy, clean, lengths), drafter.split_hidden(noisy, clean, lengths)
        drafter.set_attention_backend("flex")
        try:
            got = drafter.training_hidden(noisy, clean, lengths), drafter.split_hidden(noisy, clean, lengths)
        except _compiler_errors() as e:
            pytest.skip(f"transformers' flex_attention path cannot run here: {type(e).__name__}: {e}")
        finally:
            drafter.set_attention_backend("sdpa")
    valid = torch.cat([torch.arange(seq_len) < lengths[:, None]] * 2, dim=1)
    for g, w in zip(got, want):
        torch.testing.assert_close(g[valid], w[valid], atol=1e-5, rtol=1e-5)
