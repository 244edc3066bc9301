"""The decoding engine's forward through a Llama-family decoder, in a few fused operations per layer.

Hugging Face's decoder spends about as long in Python and small tensor operations as in the matmuls when a forward
feeds 1-16 positions on a CPU: per layer it runs q, k and v (and gate and up) as separate products, applies RoPE in
six operations, builds and checks masks, and wraps every call in modules and keyword plumbing. On SmolLM2-135M
(float32, 2 cores) that is ~28 of the ~84 ms of a one-position forward. This forward runs the same function on the
same weights with what the engine's forward needs and nothing more, as gpt-fast and vLLM do:

* q, k and v as one product, gate and up as one (`FusedLinear`), on oneDNN-packed weights on a CPU
  (`packed_linear.py`), else as separate `F.linear` calls (no second copy of the weights);
* RoPE on q and k together in three operations, `F.rms_norm`, SDPA on the engine's own boolean mask and KV pool;
* a gated drafter's LoRA delta only on the rows that hold the mask token (two small products per fused layer, the
  clean rows untouched, so they stay exactly the parent's function as in `drafter.GatedLoRALinear`).

The result equals the Hugging Face forward up to float rounding (summation order). `fused_decoder_for` builds one
per model and kernel, or returns None with the reason when a model does not fit (another architecture, sliding-window
attention, an unmerged peft adapter): the engine then runs Hugging Face's decoder. It is an inference forward (no
gradients); training keeps Hugging Face's modules.
Packed copies are rebuilt when a weight is updated in place (its version), so a model still being trained stays
correct.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ar2dlm.drafter.gated import GatedDrafterLM, GatedLoRALinear
from ar2dlm.model.packed_linear import pack_weight, packed_linear

FUSABLE_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class FusedLinear:
    """Linear layers that read the same input, run as one product; gated LoRA deltas applied to chosen rows."""

    def __init__(self, modules: list[nn.Module], kernel: str):
        self.modules = modules
        self.bases = [m.base if isinstance(m, GatedLoRALinear) else m for m in modules]
        self.sizes = [b.out_features for b in self.bases]
        self.out_features = sum(self.sizes)
        self.packed = kernel == "onednn"
        params = [t for b in self.bases for t in (b.weight, b.bias) if t is not None]
        self._sources = params + [t for m in modules if isinstance(m, GatedLoRALinear) for t in (m.lora_A, m.lora_B)]
        self._key = None

    def _refresh(self) -> None:
        """(Re)build the packed weight and the stacked LoRA matrices when a source tensor was updated in place (its
        version moved; checked every call, ~1 us). A parameter replaced by a new tensor object is not seen: build
        a new engine then."""
        key = [t._version for t in self._sources]
        if key == self._key:
            return
        if self.packed:  # otherwise the parts' own weights and biases are used as they are
            self.weight = pack_weight(torch.cat([b.weight.detach() for b in self.bases]))
            biases = [b.bias if b.bias is not None else b.weight.new_zeros(b.out_features) for b in self.bases]
            self.bias = torch.cat(biases).detach() if any(b.bias is not None for b in self.bases) else None
        self.lora_down, self.lora_up = self._stack_lora()
        self._key = key

    def _stack_lora(self):
        """One [in, R] down-projection for all gated parts and a block-diagonal [R, out] up-projection with each
        part's scaling folded in, so the delta of every part is two products."""
        gated = [(i, m) for i, m in enumerate(self.modules) if isinstance(m, GatedLoRALinear)]
        if not gated:
            return None, None
        down = torch.cat([m.lora_A.detach() for _, m in gated]).t().contiguous()
        up = down.new_zeros(down.shape[1], self.out_features)
        offsets = [0]
        for size in self.sizes:
            offsets.append(offsets[-1] + size)
        rank_start = 0
        for i, m in gated:
            rank = m.lora_A.shape[0]
            up[rank_start:rank_start + rank, offsets[i]:offsets[i + 1]] = m.lora_B.detach().t() * m.scaling
            rank_start += rank
        return down, up

    def __call__(self, x: torch.Tensor, gated_rows) -> torch.Tensor:
        """x [..., in] -> [..., out]; `gated_rows` (a slice or an index tensor over the flattened rows, or None)
        are the mask-token rows that get the LoRA delta."""
        self._refresh()
        rows = x.reshape(-1, x.shape[-1])
        if self.packed:
            out = packed_linear(rows, self.weight, self.bias, self.out_features)
        elif len(self.bases) == 1:
            out = F.linear(rows, self.bases[0].weight, self.bases[0].bias)
        else:
            out = torch.cat([F.linear(rows, b.weight, b.bias) for b in self.bases], dim=-1)
        if gated_rows is not None and self.lora_down is not None:
            if isinstance(gated_rows, slice):
                out[gated_rows].addmm_(rows[gated_rows] @ self.lora_down, self.lora_up)
            else:
                out.index_add_(0, gated_rows, rows.index_select(0, gated_rows) @ self.lora_down @ self.lora_up)
        return out.view(*x.shape[:-1], self.out_features)


class _Norm:
    """An RMSNorm module with its epsilon read once (the forward calls it twice per layer)."""

    def __init__(self, module: nn.Module):
        self.module, self.weight = module, module.weight
        self.eps = module.variance_epsilon if hasattr(module, "variance_epsilon") else getattr(module, "eps", 1e-6)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            return self.module(x)  # the model's own module: its upcast and cast back for half precision
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _rope(t: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """t * cos + rotate_half(t) * sin on [B, S, H, D]; rotate_half(t) * sin is the halves swapped times
    [-sin_1, sin_2]."""
    half = t.shape[-1] // 2
    return torch.addcmul(t * cos, t.unflatten(-1, (2, half)).flip(-2).flatten(-2), signed_sin)


class _Layer:
    def __init__(self, layer: nn.Module, kernel: str):
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = FusedLinear([attn.q_proj, attn.k_proj, attn.v_proj], kernel)
        self.o = FusedLinear([attn.o_proj], kernel)
        self.gate_up = FusedLinear([mlp.gate_proj, mlp.up_proj], kernel)
        self.down = FusedLinear([mlp.down_proj], kernel)
        self.input_norm, self.post_norm = _Norm(layer.input_layernorm), _Norm(layer.post_attention_layernorm)
        self.q_norm = _Norm(attn.q_norm) if hasattr(attn, "q_norm") else None
        self.k_norm = _Norm(attn.k_norm) if hasattr(attn, "k_norm") else None
        self.scaling = attn.scaling


class FusedDecoder:
    """`decoder_output(...).last_hidden_state` of a BlockDiffusionLM for the engine's cached forwards."""

    def __init__(self, dlm, kernel: str):
        self.dlm = dlm
        self.decoder = dlm.backbone.get_decoder()
        cfg = dlm.hf_config
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.q_heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.intermediate = cfg.intermediate_size
        self.layers = [_Layer(layer, kernel) for layer in self.decoder.layers]
        self.final_norm = _Norm(self.decoder.norm)
        self.mask_id = dlm.config.mask_token_id if isinstance(dlm, GatedDrafterLM) else None

    def _gated_rows(self, ids: torch.Tensor):
        """The flattened rows holding the mask token (a slice when contiguous, as a verify forward's mask block
        is), or None when nothing is gated."""
        if self.mask_id is None:
            return None
        index = (ids.reshape(-1) == self.mask_id).nonzero().squeeze(1)
        if index.numel() == 0:
            return None
        first, last = int(index[0]), int(index[-1])
        return slice(first, last + 1) if last - first + 1 == index.numel() else index

    @torch.no_grad()
    def hidden(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache,
               capture: tuple[int, ...] = ()):
        """Final hidden states [B, S, H] of `ids` at `positions`, reading and writing the bound KV pool `cache`
        (`kv_cache.KVCachePool`) under the boolean `mask` [B, 1, S, kv_len]. With `capture` (entries of Hugging
        Face's `hidden_states`: i = after i layers, the last one after the final norm) it returns (final hidden
        states, those entries concatenated [B, S, len(capture) * H]), for a feature drafter."""
        batch, seq = ids.shape
        hq, hk, d = self.q_heads, self.kv_heads, self.head_dim
        x = self.dlm.embed(ids)
        cos, sin = self.decoder.rotary_emb(x, positions)
        cos = cos[:, :, None, :]
        signed_sin = torch.cat([-sin[..., :d // 2], sin[..., d // 2:]], dim=-1)[:, :, None, :]
        gated = self._gated_rows(ids)
        captured = {0: x} if 0 in capture else {}
        for i, (cache_layer, layer) in enumerate(zip(cache.layers, self.layers), start=1):
            qkv = layer.qkv(layer.input_norm(x), gated).view(batch, seq, hq + 2 * hk, d)
            if layer.q_norm is None:
                qk = _rope(qkv[:, :, :hq + hk], cos, signed_sin)
                q, k = qk[:, :, :hq], qk[:, :, hq:]
            else:
                q = _rope(layer.q_norm(qkv[:, :, :hq]), cos, signed_sin)
                k = _rope(layer.k_norm(qkv[:, :, hq:hq + hk]), cos, signed_sin)
            keys, values = cache_layer.update(k.transpose(1, 2), qkv[:, :, hq + hk:].transpose(1, 2))
            att = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                                 scale=layer.scaling, enable_gqa=hq != hk)
            x = x + layer.o(att.transpose(1, 2).reshape(batch, seq, hq * d), gated)
            gate_up = layer.gate_up(layer.post_norm(x), gated)
            act = F.silu(gate_up[..., :self.intermediate]).mul_(gate_up[..., self.intermediate:])
            x = x + layer.down(act, gated)
            if i in capture:
                captured[i] = x
        final = self.final_norm(x)
        if not capture:
            return final
        captured[len(self.layers)] = final
        return final, torch.cat([captured[i] for i in capture], dim=-1)


def unfusable_reason(dlm) -> str | None:
    """Why `dlm` cannot run the fused forward (None when it can)."""
    cfg = dlm.hf_config
    if cfg.model_type not in FUSABLE_TYPES:
        return f"architecture {cfg.model_type!r}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or ()):
        return "sliding-window attention"
    if getattr(cfg, "partial_rotary_factor", 1.0) != 1.0:
        return "partial rotary embedding"
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for layer in dlm.backbone.get_decoder().layers:
        parts = [getattr(layer.self_attn, n, None) for n in names[:4]] + [getattr(layer.mlp, n, None)
                                                                          for n in names[4:]]
        for part in parts:
            base = part.base if isinstance(part, GatedLoRALinear) else part
            if not isinstance(base, nn.Linear):  # e.g. an unmerged peft adapter
                return "linear layers that are not plain nn.Linear"
    return None


def fused_decoder_for(dlm, kernel: str) -> FusedDecoder | None:
    """The model's fused decoder for `kernel` (built once per model, kernel, device and dtype, so moving or casting
    the model gets a fresh one), or None when it does not fit."""
    if unfusable_reason(dlm) is not None:
        return None
    built = dlm.__dict__.setdefault("_fused_decoders", {})
    key = (kernel, dlm.mask_embedding.device, dlm.mask_embedding.dtype)
    if key not in built:
        built[key] = FusedDecoder(dlm, kernel)
    return built[key]
