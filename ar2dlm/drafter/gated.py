"""A gated drafter: a frozen AR parent plus LoRA and a mask-token embedding that act only on mask positions.

Every linear layer of the parent is wrapped so that its LoRA delta is multiplied by a per-token 0/1 gate, set for
each forward from the ids fed (`input_ids == mask_token_id`). A clean position therefore runs the parent's own
weights, bit for bit (base(x) + 0), and with the token-causal clean attention of `attention._drafter_allowed` it
sees exactly what it would see in the parent: its hidden states, logits and K/V are the parent's. Mask positions
get the trained path and draft the tokens after the clean prefix, which a verify decoder checks against the
parent's own logits at the clean positions of the same forward.

Saved as a small adapter folder (LoRA weights and the mask row in one safetensors file, `dlm_config.json` naming the
parent); `ar2dlm.model.open.load_dlm` loads it on top of the parent, unmerged, so the gate keeps working.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ar2dlm.errors import Ar2dlmError
from ar2dlm.model import attention
from ar2dlm.model.dlm import DLM_CONFIG_FILE, BlockDiffusionLM, DLMConfig, add_mask_token, load_parent

DRAFTER_WEIGHTS_FILE = "drafter.safetensors"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOKEN_CAUSAL = "token_causal"


class Gate:
    """The [batch, seq, 1] 0/1 gate shared by every gated layer of one model; None when nothing is gated."""

    def __init__(self):
        self.value: torch.Tensor | None = None

    @contextlib.contextmanager
    def use(self, value: torch.Tensor | None):
        previous, self.value = self.value, value
        try:
            yield
        finally:
            self.value = previous

    def checkpoint_contexts(self):
        """`context_fn` for torch.utils.checkpoint: activation recomputation in backward runs after the forward's
        gate was restored, so it re-installs the gate that was live when the layer first ran."""
        return contextlib.nullcontext(), self.use(self.value)


class GatedLoRALinear(nn.Module):
    """A frozen linear layer plus a LoRA delta that only gated positions receive."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, gate: Gate):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype,
                                               device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype,
                                               device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # B = 0: the delta starts at exactly zero
        self.scaling = alpha / rank
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        gate = self.gate.value
        if gate is None:
            return out
        if gate.shape[:-1] != x.shape[:-1]:
            raise RuntimeError(f"drafter gate of shape {tuple(gate.shape)} does not fit input {tuple(x.shape)}")
        delta = F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling
        return out + (delta * gate.to(delta.dtype)).to(out.dtype)  # exactly out where the gate is 0


def inject_gated_lora(backbone: nn.Module, rank: int, alpha: float, gate: Gate, targets=DEFAULT_TARGETS) -> int:
    """Freeze `backbone` and wrap its target linear layers in place; returns how many were wrapped."""
    for p in backbone.parameters():
        p.requires_grad_(False)
    found = [(name, m) for name, m in backbone.named_modules()
             if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    if not found:
        raise Ar2dlmError(f"no linear layers named {', '.join(targets)} to put a drafter adapter on")
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        setattr(backbone.get_submodule(parent_name), child, GatedLoRALinear(module, rank, alpha, gate))
    return len(found)


class GatedDrafterLM(BlockDiffusionLM):
    """A BlockDiffusionLM whose trainable part (gated LoRA + mask row) touches only mask positions."""

    def __init__(self, backbone: nn.Module, config: DLMConfig, rank: int = 32, alpha: float = 32,
                 targets=DEFAULT_TARGETS):
        if not config.token_shift:
            raise Ar2dlmError("a drafter needs token shift: its drafts extend the parent's own next token")
        config.drafter, config.clean_attention = True, TOKEN_CAUSAL
        super().__init__(backbone, config)
        self.gate = Gate()
        self.lora_settings = {"rank": rank, "alpha": alpha, "targets": list(targets)}
        inject_gated_lora(backbone, rank, alpha, self.gate, targets)

    @classmethod
    def from_base(cls, backbone, tokenizer, block_size: int = 4, token_shift: bool = True,
                  mask_token: str | None = None, base_model: str | None = None, rank: int = 32,
                  alpha: float = 32) -> "GatedDrafterLM":
        mask_id = add_mask_token(backbone, tokenizer, mask_token)
        cfg = DLMConfig(block_size=block_size, mask_token_id=mask_id, token_shift=token_shift, base_model=base_model)
        return cls(backbone, cfg, rank=rank, alpha=alpha)

    def gate_for(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """1 at mask tokens, 0 elsewhere; None when there is none, so a clean forward costs what the parent's does."""
        is_mask = input_ids == self.config.mask_token_id
        if not bool(is_mask.any()):
            return None
        return is_mask[..., None].to(self.mask_embedding.dtype)

    def enable_gradient_checkpointing(self) -> None:
        self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
            "use_reentrant": False, "context_fn": self.gate.checkpoint_contexts})

    @property
    def checkpointing(self) -> bool:
        """Whether the decoder layers recompute activations in backward (Hugging Face then refuses a KV cache)."""
        return any(getattr(m, "gradient_checkpointing", False) is True for m in self.backbone.modules())

    # ------------------------------------------------------------------------------------------------- forward
    def decoder_output(self, input_ids: torch.Tensor, **kwargs):
        """`BlockDiffusionLM.decoder_output` gated by the ids fed: clean and mask positions may be mixed in one
        (KV-cached) forward, as the engine's verify policy does."""
        with self.gate.use(self.gate_for(input_ids)):
            return super().decoder_output(input_ids, **kwargs)

    def layout_mask(self, seq_len: int, block_size: int, lengths: torch.Tensor | None, device):
        """The drafter's [noisy | clean] mask (token-causal clean copy), for the one-forward `training_hidden`.
        Training uses the cheaper `split_hidden`; the one-forward layout is its reference and serves the dLM tools."""
        if self.attention_backend == "flex":
            return attention.drafter_flex_mask(seq_len, block_size, lengths, device=device)
        return attention.drafter_dense_mask(seq_len, block_size, lengths, device=device)

    @torch.no_grad()
    def clean_pass(self, clean_ids: torch.Tensor):
        """The parent over the clean sequence (plain causal attention, nothing gated, no gradients): final hidden
        states [N, L, H] and the cache holding its K/V. Right padding needs no mask: valid queries are causal."""
        from transformers import DynamicCache

        cache = DynamicCache()  # full layers: a sliding-window layer would drop clean K/V the mask allows
        with self.gate.use(None):
            out = BlockDiffusionLM.decoder_output(self, clean_ids, past_key_values=cache, use_cache=True)
        return out.last_hidden_state, cache

    def noisy_pass(self, noisy_ids: torch.Tensor, cache, lengths=None, block_size=None,
                   causal_in_block: bool = False) -> torch.Tensor:
        """The noisy half on top of `cache` (the clean half's K/V, which it extends): hidden states [N, L, H]."""
        n, seq_len = noisy_ids.shape
        block_size = block_size or self.config.block_size
        if self.attention_backend == "flex":
            mask = attention.drafter_flex_mask(seq_len, block_size, lengths, device=noisy_ids.device,
                                               noisy_only=True, causal_in_block=causal_in_block)
        else:
            mask = attention.drafter_noisy_mask(seq_len, block_size, lengths, noisy_ids.device, causal_in_block)
        pos = torch.arange(seq_len, device=noisy_ids.device).expand(n, -1)
        with self.gate.use(self.gate_for(noisy_ids)):
            out = BlockDiffusionLM.decoder_output(self, noisy_ids, attention_mask=mask, position_ids=pos,
                                                  past_key_values=cache, use_cache=True)
        return out.last_hidden_state

    def split_hidden(self, noisy_ids, clean_ids, lengths=None, block_size=None) -> torch.Tensor:
        """`training_hidden` computed in two passes: the clean half once without gradients (it has no trainable
        path), then the noisy half with gradients over the detached clean K/V. Same [noisy | clean] output."""
        clean_hidden, cache = self.clean_pass(clean_ids)
        noisy_hidden = self.noisy_pass(noisy_ids, cache, lengths, block_size)
        return torch.cat([noisy_hidden, clean_hidden], dim=1)

    # ----------------------------------------------------------------------------------------------- save/load
    def adapter_state(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The trained weights only: every LoRA matrix, by its layer's name, and the mask-token row."""
        state = {f"{name}.{part}": getattr(m, part).detach().to("cpu", dtype).contiguous()
                 for name, m in self.backbone.named_modules() if isinstance(m, GatedLoRALinear)
                 for part in ("lora_A", "lora_B")}
        state["mask_embedding"] = self.mask_embedding.detach().to("cpu", dtype).contiguous()
        return state

    def save_pretrained(self, path: str | os.PathLike, tokenizer=None, base_model: str | None = None,
                        dtype: torch.dtype = torch.float32) -> None:
        """An adapter folder; `dtype` float16 halves the file (loading casts back to the model's dtype)."""
        from ar2dlm.drafter.folder import save_drafter_folder

        save_drafter_folder(self, path, DRAFTER_WEIGHTS_FILE, self.adapter_state(dtype),
                            {"drafter": self.lora_settings}, tokenizer, base_model)


def is_drafter_folder(path: Path) -> bool:
    return (Path(path) / DRAFTER_WEIGHTS_FILE).is_file()


def read_drafter_config(path: str | os.PathLike) -> dict:
    """The `dlm_config.json` of a saved drafter folder: {dlm, base_model, drafter: {rank, alpha, targets}, ...}."""
    return json.loads((Path(path) / DLM_CONFIG_FILE).read_text())


def copy_adapter_weights(model: GatedDrafterLM, path: str | os.PathLike) -> None:
    """Load a saved drafter's LoRA matrices and mask-token row into `model` (same parent layers, same rank)."""
    from safetensors.torch import load_file

    state = load_file(str(Path(path) / DRAFTER_WEIGHTS_FILE))
    with torch.no_grad():
        model.mask_embedding.copy_(state.pop("mask_embedding"))
        layers = dict(model.backbone.named_modules())
        for key, value in state.items():
            name, part = key.rsplit(".", 1)
            layer = layers.get(name)
            if not isinstance(layer, GatedLoRALinear) or getattr(layer, part).shape != value.shape:
                raise Ar2dlmError(f"{path}: drafter weight {key} {tuple(value.shape)} has no matching layer in "
                                  f"{model.config.base_model}")
            getattr(layer, part).copy_(value)


def load_drafter(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu"):
    """A saved drafter on top of a fresh copy of its parent, and the drafter's tokenizer."""
    from transformers import AutoTokenizer

    path = Path(path)
    meta = read_drafter_config(path)
    lora = meta["drafter"]
    model = GatedDrafterLM(load_parent(meta, dtype, device), DLMConfig.from_dict(meta["dlm"]), lora["rank"],
                           lora["alpha"], lora["targets"])
    copy_adapter_weights(model, path)
    return model.to(device), AutoTokenizer.from_pretrained(path)
