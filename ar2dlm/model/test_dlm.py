"""BlockDiffusionLM: equivalence with the AR model, the attention layout seen through the model, mask token, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.dlm import DEFAULT_MASK_TOKEN, BlockDiffusionLM, DLMConfig
from ar2dlm.testing import tiny_base, tiny_model, tiny_tokenizer

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
ATOL = 1e-5


def _dlm(family="llama", block_size=4, token_shift=True, **overrides):
    """A fresh tokenizer, a tiny AR model, and the dLM built from them; returns (dlm, AR model copy, tokenizer)."""
    tok = tiny_tokenizer()
    base = tiny_model(family, vocab_size=len(tok), **overrides)
    ar = tiny_model(family, vocab_size=len(tok), **overrides)  # same seed: an untouched copy of the AR model
    model = BlockDiffusionLM.from_base(base, tok, block_size=block_size, token_shift=token_shift).eval()
    return model, ar, tok


def _ids(n, seq_len, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq_len), generator=g)


def _block_causal(seq_len, block_size):
    pos = torch.arange(seq_len)
    return (pos[None, :] // block_size <= pos[:, None] // block_size)[None, None]


# ------------------------------------------------------------------------------------------- AR equivalence
@pytest.mark.parametrize("family", FAMILIES)
def test_block_size_one_reproduces_ar_logits(family):
    model, ar, tok = _dlm(family, block_size=1, token_shift=True)
    vocab = ar.config.vocab_size
    assert model.backbone.get_input_embeddings().weight.shape[0] == vocab + 1
    ids = _ids(2, 11, vocab, seed=1)
    with torch.no_grad():
        ar_logits = ar(ids).logits
        hidden = model.training_hidden(ids, ids)  # noisy == clean: no mask tokens
        noisy_logits = model.logits(hidden[:, :11])
        clean_logits = model.logits(hidden[:, 11:])
    torch.testing.assert_close(noisy_logits[..., :vocab], ar_logits, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(clean_logits[..., :vocab], ar_logits, atol=ATOL, rtol=ATOL)
    # token shift, B=1: the logit that predicts token p is the AR logit at p-1 (the clean copy's)
    scored = torch.ones(2, 11, dtype=torch.bool)
    scored[:, 0] = False
    with torch.no_grad():
        logits, targets = model.diffusion_logits(ids, ids, scored)
    torch.testing.assert_close(logits[:, :vocab], ar_logits[:, :-1].reshape(-1, vocab), atol=ATOL, rtol=ATOL)
    assert torch.equal(targets, ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("family", FAMILIES)
def test_no_token_shift_block_size_one_noisy_copy_is_ar(family):
    model, ar, tok = _dlm(family, block_size=1, token_shift=False)
    vocab = ar.config.vocab_size
    ids = _ids(2, 9, vocab, seed=2)
    scored = torch.ones(2, 9, dtype=torch.bool)
    with torch.no_grad():
        ar_logits = ar(ids).logits
        logits, targets = model.diffusion_logits(ids, ids, scored)  # position 0 may be scored without shift
    torch.testing.assert_close(logits[:, :vocab], ar_logits.reshape(-1, vocab), atol=ATOL, rtol=ATOL)
    assert torch.equal(targets, ids.reshape(-1))


def test_forward_is_causal_lm_call():
    model, ar, tok = _dlm("llama")
    vocab = ar.config.vocab_size
    ids = _ids(1, 7, vocab, seed=3)
    with torch.no_grad():
        logits, _ = model(ids)
    torch.testing.assert_close(logits[..., :vocab], ar(ids).logits, atol=ATOL, rtol=ATOL)
    assert (logits.argmax(-1) != model.config.mask_token_id).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_kv_cache_goes_under_the_decoders_own_keyword_without_a_warning(family):
    """The engine hands its cache over as `past_key_values`; transformers releases that renamed it `cache` warn on
    every forward given the old name (issue 13), so decoder_output passes it under whichever name the decoder takes."""
    import warnings

    from transformers import DynamicCache

    model, ar, tok = _dlm(family, block_size=1)
    ids = _ids(1, 6, ar.config.vocab_size, seed=4)
    cache = DynamicCache(config=model.hf_config)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model.decoder_output(ids[:, :4], past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == 4  # the decoder filled the cache it was given
        step = model.decoder_output(ids[:, 4:], past_key_values=cache, use_cache=True,
                                    position_ids=torch.arange(4, 6)[None]).last_hidden_state
    full = model.decoder_output(ids).last_hidden_state
    torch.testing.assert_close(step, full[:, 4:], atol=ATOL, rtol=ATOL)


# ------------------------------------------------------------------------------------------- the layout
@pytest.mark.parametrize("block_size", (1, 3, 4))
def test_clean_copy_ignores_noisy_copy_and_is_block_causal(block_size):
    model, ar, tok = _dlm("qwen2", block_size=block_size)
    vocab = ar.config.vocab_size
    seq_len = 10
    clean = _ids(2, seq_len, vocab, seed=4)
    noisy_a = clean.clone()
    noisy_a[:, ::2] = model.config.mask_token_id
    noisy_b = _ids(2, seq_len, vocab + 1, seed=5)  # arbitrary, mask id included
    with torch.no_grad():
        ha = model.training_hidden(noisy_a, clean)
        hb = model.training_hidden(noisy_b, clean)
        ref = model._decoder()(
            input_ids=clean, attention_mask=_block_causal(seq_len, block_size), use_cache=False
        ).last_hidden_state
        ar_hidden = ar.model(clean).last_hidden_state
    assert torch.equal(ha[:, seq_len:], hb[:, seq_len:])
    torch.testing.assert_close(ha[:, seq_len:], ref, atol=ATOL, rtol=ATOL)
    if block_size == 1:
        torch.testing.assert_close(ha[:, seq_len:], ar_hidden, atol=ATOL, rtol=ATOL)
    else:
        assert not torch.allclose(ha[:, seq_len:], ar_hidden, atol=1e-3)  # a block sees ahead inside itself


def test_clean_prefix_is_independent_of_later_blocks():
    model, ar, tok = _dlm("llama", block_size=4)
    vocab = ar.config.vocab_size
    seq_len = 12
    clean = _ids(1, seq_len, vocab, seed=6)
    short = clean[:, :8]
    with torch.no_grad():
        full = model.training_hidden(clean, clean)
        part = model.training_hidden(short, short)
    torch.testing.assert_close(full[:, seq_len:seq_len + 8], part[:, 8:], atol=ATOL, rtol=ATOL)


def test_noisy_block_depends_only_on_own_block_and_earlier_clean():
    model, ar, tok = _dlm("mistral", block_size=4)
    vocab = ar.config.vocab_size
    mask_id = model.config.mask_token_id
    seq_len, bsz = 12, 4
    clean = _ids(1, seq_len, vocab, seed=7)
    noisy = clean.clone()
    noisy[:, 1::3] = mask_id
    with torch.no_grad():
        base = model.training_hidden(noisy, clean)
    b = 1  # the middle block, positions 4..7
    own = slice(b * bsz, (b + 1) * bsz)

    def noisy_out(nz, cl):
        with torch.no_grad():
            return model.training_hidden(nz, cl)[:, own]

    # later blocks (both copies) do not matter
    cl2, nz2 = clean.clone(), noisy.clone()
    cl2[:, 8:] = (cl2[:, 8:] + 1) % vocab
    nz2[:, 8:] = mask_id
    torch.testing.assert_close(noisy_out(nz2, cl2), base[:, own], atol=ATOL, rtol=ATOL)
    # the noisy tokens of other blocks do not matter
    nz3 = noisy.clone()
    nz3[:, :4] = (nz3[:, :4] + 5) % vocab
    nz3[:, 8:] = (nz3[:, 8:] + 7) % vocab
    torch.testing.assert_close(noisy_out(nz3, clean), base[:, own], atol=ATOL, rtol=ATOL)
    # but its own noisy tokens and the earlier clean blocks do (the checks above are not vacuous)
    nz4 = noisy.clone()
    nz4[:, 5] = mask_id if nz4[0, 5] != mask_id else 0
    assert not torch.allclose(noisy_out(nz4, clean), base[:, own], atol=1e-4)
    cl5 = clean.clone()
    cl5[:, 0] = (cl5[:, 0] + 1) % vocab
    assert not torch.allclose(noisy_out(noisy, cl5), base[:, own], atol=1e-4)
    # and the first block's noisy copy sees no clean key at all
    cl6 = clean.clone()
    cl6[:, :] = (cl6 + 3) % vocab
    with torch.no_grad():
        first = model.training_hidden(noisy, cl6)[:, :bsz]
    torch.testing.assert_close(first, base[:, :bsz], atol=ATOL, rtol=ATOL)


def test_padding_does_not_change_valid_positions():
    model, ar, tok = _dlm("llama", block_size=4)
    vocab = ar.config.vocab_size
    seq_len, n = 12, 7
    clean = _ids(1, seq_len, vocab, seed=8)
    noisy = clean.clone()
    noisy[:, 2::3] = model.config.mask_token_id
    with torch.no_grad():
        padded = model.training_hidden(noisy, clean, lengths=torch.tensor([n]))
        alone = model.training_hidden(noisy[:, :n], clean[:, :n])
    torch.testing.assert_close(padded[:, :n], alone[:, :n], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(padded[:, seq_len:seq_len + n], alone[:, n:], atol=ATOL, rtol=ATOL)


# ------------------------------------------------------------------------------------------- predictor / logits
@pytest.mark.parametrize("block_size", (1, 3, 4))
def test_predictor_hidden_token_shift(block_size):
    model, _, _ = _dlm("llama", block_size=block_size)
    seq_len = 10
    # hidden[n, i] = 1000 * n + i (noisy i < L, clean i >= L), so every row names its source
    idx = torch.arange(2 * seq_len, dtype=torch.float32)
    hidden = torch.stack([idx + 1000 * n for n in range(2)])[..., None].expand(-1, -1, 3)
    got = model.predictor_hidden(hidden)
    assert got.shape == (2, seq_len, 3)
    for n in range(2):
        for p in range(1, seq_len):
            src = seq_len + p - 1 if p % block_size == 0 else p - 1
            assert got[n, p, 0].item() == 1000 * n + src, (n, p)
        assert got[n, 0, 0].item() == 1000 * n + seq_len  # placeholder (clean copy at 0), never scored
    model.config.token_shift = False
    assert torch.equal(model.predictor_hidden(hidden), hidden[:, :seq_len])


def test_diffusion_logits_shapes_targets_and_mask_column():
    model, ar, tok = _dlm("qwen3", block_size=4)
    vocab = model.backbone.get_input_embeddings().weight.shape[0]
    mask_id = model.config.mask_token_id
    assert mask_id == vocab - 1
    seq_len = 12
    clean = _ids(3, seq_len, vocab - 1, seed=9)
    noisy = clean.clone()
    scored = torch.rand(3, seq_len, generator=torch.Generator().manual_seed(0)) < 0.5
    scored[:, 0] = False
    scored[0, 5] = True
    noisy[scored] = mask_id
    with torch.no_grad():
        logits, targets = model.diffusion_logits(noisy, clean, scored)
    m = int(scored.sum())
    assert logits.shape == (m, vocab)
    assert torch.equal(targets, clean[scored])
    assert (logits.argmax(-1) != mask_id).all()
    assert (logits[:, mask_id] == torch.finfo(logits.dtype).min).all()
    assert torch.isfinite(logits[:, :mask_id]).all()
    bad = scored.clone()
    bad[1, 0] = True
    with pytest.raises(ValueError, match="position 0"):
        model.diffusion_logits(noisy, clean, bad)


@pytest.mark.parametrize("token_shift", (True, False))
def test_block_size_argument_overrides_the_configured_one(token_shift):
    """Distillation's block-size curriculum trains at other block sizes than the config's: the argument must act
    exactly like a model configured with it, and differ from the configured size."""
    model, _, _ = _dlm("llama", block_size=4, token_shift=token_shift)
    vocab = model.backbone.get_input_embeddings().weight.shape[0]
    clean = _ids(2, 16, vocab - 1, seed=3)
    scored = torch.zeros(2, 16, dtype=torch.bool)
    scored[:, 9:14] = True
    noisy = torch.where(scored, model.config.mask_token_id, clean)
    with torch.no_grad():
        at8, _ = model.diffusion_logits(noisy, clean, scored, block_size=8)
        at4, _ = model.diffusion_logits(noisy, clean, scored)
        model.config.block_size = 8
        configured8, _ = model.diffusion_logits(noisy, clean, scored)
    torch.testing.assert_close(at8, configured8, rtol=0, atol=0)
    assert not torch.allclose(at8, at4)


# ------------------------------------------------------------------------------------------- mask token
@pytest.mark.parametrize("tied", (True, False))
def test_mask_token_row_is_mean_of_old_rows(tied):
    tok = tiny_tokenizer()
    base = tiny_model("llama", vocab_size=len(tok), tie_word_embeddings=tied)
    old_in = base.get_input_embeddings().weight.detach().clone()
    old_out = base.get_output_embeddings().weight.detach().clone()
    n_old = len(tok)
    model = BlockDiffusionLM.from_base(base, tok)
    mask_id = model.config.mask_token_id
    assert mask_id == n_old
    assert len(tok) == n_old + 1
    assert tok.convert_tokens_to_ids(DEFAULT_MASK_TOKEN) == mask_id
    emb = model.backbone.get_input_embeddings().weight
    out = model.backbone.get_output_embeddings().weight
    assert emb.shape[0] == out.shape[0] == n_old + 1
    torch.testing.assert_close(emb[:n_old], old_in)
    torch.testing.assert_close(emb[mask_id], old_in.mean(0))
    torch.testing.assert_close(model.mask_embedding.detach(), old_in.mean(0))
    torch.testing.assert_close(out[:n_old], old_out)
    torch.testing.assert_close(out[mask_id], old_out.mean(0))
    if tied:
        assert out.data_ptr() == emb.data_ptr()
    else:
        assert out.data_ptr() != emb.data_ptr()
        assert not torch.allclose(old_in.mean(0), old_out.mean(0))  # the two means really are different rows
    # the mask embedding is what the model sees for the mask id
    ids = torch.tensor([[3, mask_id, 5]])
    with torch.no_grad():
        model.mask_embedding.add_(1.0)
        e = model.embed(ids)
    torch.testing.assert_close(e[0, 1], old_in.mean(0) + 1.0)
    torch.testing.assert_close(e[0, 0], old_in[3])


def test_reuse_existing_token_adds_no_row():
    tok = tiny_tokenizer()
    base = tiny_model("llama", vocab_size=len(tok))
    n = len(tok)
    model = BlockDiffusionLM.from_base(base, tok, mask_token="<|im_start|>")
    assert model.config.mask_token_id == tok.convert_tokens_to_ids("<|im_start|>")
    assert len(tok) == n
    assert model.backbone.get_input_embeddings().weight.shape[0] == n


def test_unknown_mask_token_raises():
    tok = tiny_tokenizer()
    base = tiny_model("llama", vocab_size=len(tok))
    with pytest.raises(Ar2dlmError, match="not in the vocabulary"):
        BlockDiffusionLM.from_base(base, tok, mask_token="<|no-such-token|>")


def test_existing_default_mask_token_is_reused():
    tok = tiny_tokenizer()
    first = BlockDiffusionLM.from_base(tiny_model("llama", vocab_size=len(tok)), tok)
    n = len(tok)
    second = BlockDiffusionLM.from_base(first.backbone, tok)
    assert second.config.mask_token_id == first.config.mask_token_id
    assert len(tok) == n
    assert second.backbone.get_input_embeddings().weight.shape[0] == n


def test_tokenizer_from_earlier_conversion_on_fresh_base():
    tok = tiny_tokenizer()
    n = len(tok)
    BlockDiffusionLM.from_base(tiny_model("llama", vocab_size=n), tok)  # tok now holds the mask token
    fresh = tiny_model("llama", vocab_size=n, seed=1)
    old = fresh.get_input_embeddings().weight.detach().clone()
    model = BlockDiffusionLM.from_base(fresh, tok)
    assert model.config.mask_token_id == n
    assert model.backbone.get_input_embeddings().weight.shape[0] == n + 1
    torch.testing.assert_close(model.mask_embedding.detach(), old.mean(0))


def test_padded_vocabulary_reuses_a_spare_row():
    tok = tiny_tokenizer()
    n = len(tok)
    base = tiny_model("qwen2", vocab_size=n + 8)  # like Qwen: more embedding rows than tokens
    old = base.get_input_embeddings().weight.detach().clone()
    model = BlockDiffusionLM.from_base(base, tok)
    assert model.config.mask_token_id == n
    assert model.backbone.get_input_embeddings().weight.shape[0] == n + 8
    torch.testing.assert_close(model.mask_embedding.detach(), old[:n].mean(0))


def test_dlm_config_validation():
    with pytest.raises(Ar2dlmError):
        DLMConfig(block_size=0)
    assert DLMConfig.from_dict({"block_size": 8, "mask_token_id": 3, "token_shift": False, "other": 1}) == DLMConfig(
        8, 3, False
    )
    tok = tiny_tokenizer()
    base = tiny_model("llama", vocab_size=len(tok))
    with pytest.raises(Ar2dlmError, match="outside the vocabulary"):
        BlockDiffusionLM(base, DLMConfig(mask_token_id=len(tok)))


# ------------------------------------------------------------------------------------------- save / load
def _batch(model, vocab, seq_len=12, n=2, seed=10):
    clean = _ids(n, seq_len, vocab, seed=seed)
    scored = torch.rand(n, seq_len, generator=torch.Generator().manual_seed(seed)) < 0.5
    scored[:, 0] = False
    scored[:, 4] = True  # a block start: uses the clean copy
    noisy = clean.clone()
    noisy[scored] = model.config.mask_token_id
    return noisy, clean, scored


def _dlogits(model, batch):
    with torch.no_grad():
        return model.diffusion_logits(*batch)[0]


@pytest.mark.parametrize("tied", (True, False))
def test_full_save_load_round_trip(tmp_path, tied):
    model, ar, tok = _dlm("llama", block_size=4, tie_word_embeddings=tied)
    with torch.no_grad():
        model.mask_embedding.normal_()  # as if trained
    batch = _batch(model, ar.config.vocab_size)
    before = _dlogits(model, batch)
    out = tmp_path / "dlm"
    model.save_pretrained(out, tok)
    assert (out / "model.safetensors").is_file()
    cfg = json.loads((out / "config.json").read_text())
    dlm_entry = {k: cfg["dlm"][k] for k in ("block_size", "mask_token_id", "token_shift")}
    assert dlm_entry == {"block_size": 4, "mask_token_id": model.config.mask_token_id, "token_shift": True}
    assert "quantization_config" not in cfg
    assert not list(tmp_path.glob(".dlm.*"))  # no temp folder left behind

    loaded, tok2 = BlockDiffusionLM.from_pretrained(out)
    loaded.eval()
    assert loaded.config == model.config
    assert not loaded.is_lora
    assert len(tok2) == len(tok)
    assert tok2.convert_tokens_to_ids(DEFAULT_MASK_TOKEN) == model.config.mask_token_id
    torch.testing.assert_close(loaded.mask_embedding, model.mask_embedding)
    torch.testing.assert_close(_dlogits(loaded, batch), before, atol=ATOL, rtol=ATOL)
    # saving again over the same folder replaces it
    loaded.save_pretrained(out, tok2)
    again, _ = BlockDiffusionLM.from_pretrained(out)
    torch.testing.assert_close(_dlogits(again.eval(), batch), before, atol=ATOL, rtol=ATOL)


def _lora_setup(tmp_path, tied=True):
    from ar2dlm.model.loading import load_base

    if tied:
        folder = tiny_base(tmp_path, "llama")
    else:
        folder = tmp_path / "tiny-untied"
        tok = tiny_tokenizer()
        tiny_model("llama", vocab_size=len(tok), tie_word_embeddings=False).save_pretrained(folder)
        tok.save_pretrained(folder)
    backbone, tok = load_base(str(folder))
    model = BlockDiffusionLM.from_base(backbone, tok, block_size=4).eval()
    model.apply_lora(rank=4)
    assert model.is_lora
    g = torch.Generator().manual_seed(11)
    n_b = 0
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
                n_b += 1
        model.mask_embedding.add_(torch.randn(model.mask_embedding.shape, generator=g))
    assert n_b > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "mask_embedding" in trainable
    assert all("lora_" in n or n == "mask_embedding" for n in trainable)
    return model, tok, folder


@pytest.mark.parametrize("tied", (True, False))
def test_lora_save_load_round_trip(tmp_path, tied):
    model, tok, folder = _lora_setup(tmp_path, tied)
    vocab = model.backbone.get_input_embeddings().weight.shape[0] - 1
    batch = _batch(model, vocab)
    before = _dlogits(model, batch)
    out = tmp_path / "adapter"
    with pytest.raises(Ar2dlmError, match="base model"):
        model.save_pretrained(out, tok)
    model.save_pretrained(out, tok, base_model=str(folder))
    assert (out / "adapter_config.json").is_file()
    assert (out / "mask_embedding.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    meta = json.loads((out / "dlm_config.json").read_text())
    assert meta["base_model"] == str(folder)
    assert meta["dlm"]["mask_token_id"] == model.config.mask_token_id
    adapter_bytes = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    full_bytes = (folder / "model.safetensors").stat().st_size
    # no full weights (nor the resized embedding matrix) in the adapter: LoRA factors + one mask row only
    emb_bytes = model.backbone.get_input_embeddings().weight.numel() * 4
    assert adapter_bytes < min(full_bytes / 4, emb_bytes), (adapter_bytes, full_bytes, emb_bytes)

    merged, _ = BlockDiffusionLM.from_pretrained(out)
    assert not merged.is_lora
    torch.testing.assert_close(merged.mask_embedding, model.mask_embedding)
    torch.testing.assert_close(_dlogits(merged.eval(), batch), before, atol=ATOL, rtol=ATOL)
    unmerged, _ = BlockDiffusionLM.from_pretrained(out, merge_lora=False)
    assert unmerged.is_lora
    torch.testing.assert_close(_dlogits(unmerged.eval(), batch), before, atol=ATOL, rtol=ATOL)

    # and the LoRA weights matter: the plain converted base gives different logits
    backbone = tiny_model("llama", vocab_size=vocab, tie_word_embeddings=tied)
    plain = BlockDiffusionLM.from_base(backbone, tiny_tokenizer(), block_size=4).eval()
    assert not torch.allclose(_dlogits(plain, batch), before, atol=1e-3)


def test_from_pretrained_rejects_plain_causal_lm_and_missing_folder(tmp_path):
    folder = tiny_base(tmp_path, "qwen2")
    with pytest.raises(Ar2dlmError, match="plain causal LM"):
        BlockDiffusionLM.from_pretrained(folder)
    with pytest.raises(Ar2dlmError, match="no dLM checkpoint"):
        BlockDiffusionLM.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("token_shift", [True, False])
@pytest.mark.parametrize("masked_positions", [(9, 11), (8, 9, 10, 11), (8,), (10,)])
def test_training_and_decoding_see_the_same_thing(token_shift, masked_positions):
    """The logits the loss trains at a masked position are exactly what the decoder computes there.

    Training: the [noisy | clean] layout with the last block partially masked. Decoding: the plain sequence up to the
    end of that block, block-causal attention, the same tokens masked. Any mismatch (a shifted target, a wrong
    attention rule) would train the model for a situation the decoder never creates.
    """
    from ar2dlm.model.attention import block_causal_mask

    tok = tiny_tokenizer()
    model = tiny_model("llama", seed=3, vocab_size=len(tok))
    dlm = BlockDiffusionLM.from_base(model, tok, block_size=4, token_shift=token_shift).eval()
    torch.manual_seed(0)
    clean = torch.randint(0, len(tok) - 1, (1, 12))
    masked = torch.zeros(1, 12, dtype=torch.bool)
    masked[0, list(masked_positions)] = True
    noisy = torch.where(masked, dlm.config.mask_token_id, clean)
    with torch.no_grad():
        train_logits, targets = dlm.diffusion_logits(noisy, clean, masked)
        decode_logits, _ = dlm(noisy, attention_mask=block_causal_mask(12, 4), position_ids=torch.arange(12)[None])
    rows = [p - 1 if token_shift else p for p in masked_positions]
    torch.testing.assert_close(train_logits, decode_logits[0, rows], atol=1e-5, rtol=1e-5)
    assert torch.equal(targets, clean[0, list(masked_positions)])
