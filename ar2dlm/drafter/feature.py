"""The feature drafter: a small block-diffusion model that drafts from the frozen parent's own hidden states.

The parent runs unchanged (its weights, its vocabulary, its KV cache): every forward of the `verify` policy is a
plain forward of the parent over the last committed token and the drafts it checks. Besides its logits, that
forward yields the parent's hidden states at a few layers (low / mid / high, `feature_layers`: the output after that
many decoder layers). The drafter reads them, without any further parent forward:

    context  = fuse(concat(features at the last `window` committed positions))       [W, H]
    block    = [embedding of the last committed token, mask, mask, ...]              [B, H]  (B = block size)
    drafts   = LM head(norm(draft layers(block | context)))  at the B - 1 mask slots

Each draft layer is a Llama decoder layer sized from the parent's config (initialised from the parent's top layers):
the block's queries attend to the context (its keys and values come from the layer's own k/v projections of the
fused features) and to the whole block, both ways (bidirectional inside the block, as in block diffusion). The
parent's embeddings and LM head are shared and frozen; what trains is `fuse`, the draft layers, the final norm and
the mask embedding: ~`num_layers` decoder layers, a few MB. Training never backpropagates through the parent, and
the parent's features for a corpus are computed once (`drafter/feature_cache.py`), so a training step costs a small
fraction of a parent step (`drafter/feature_training.py`).

The window makes the drafter's input a fixed shape (batched decoding needs no ragged context); the parent's
features at the last positions already summarise everything before them. Positions inside the drafter are local:
context slots 0..W-1, the block at W..W+B-1 (RoPE only sees distances), so nothing depends on the absolute position.

Saved as a folder: `feature_drafter.safetensors` (the trained weights) and `dlm_config.json` naming the parent and
the drafter's settings; it loads on top of a fresh copy of the parent (`load_feature_drafter`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.dlm import DLM_CONFIG_FILE, BlockDiffusionLM, DLMConfig, add_mask_token, load_parent

WEIGHTS_FILE = "feature_drafter.safetensors"
KIND = "feature"


def default_feature_layers(num_layers: int) -> list[int]:
    """Low, mid and high: after 2 layers, half of them, and all of them (the state the parent's head reads)."""
    return sorted({min(2, num_layers), max(1, num_layers // 2), num_layers})


@dataclass
class FeatureDrafterConfig:
    feature_layers: list[int] = field(default_factory=list)  # parent hidden states after this many decoder layers
    num_layers: int = 2  # draft decoder layers
    window: int = 32  # committed positions whose features the drafter reads
    draft_vocab: int = 0  # tokens it may draft (the most frequent of its training targets); 0: the whole vocabulary

    def check(self, parent_layers: int) -> None:
        if not self.feature_layers:
            raise Ar2dlmError("a feature drafter needs at least one parent feature layer")
        bad = [i for i in self.feature_layers if not 1 <= i <= parent_layers]
        if bad:
            raise Ar2dlmError(f"feature layers {bad} outside the parent's 1..{parent_layers} decoder layers")
        if self.num_layers < 1:
            raise Ar2dlmError(f"a feature drafter needs >= 1 draft layer, got {self.num_layers}")
        if self.window < 1:
            raise Ar2dlmError(f"the feature window must be >= 1 position, got {self.window}")
        if self.draft_vocab < 0:
            raise Ar2dlmError(f"the draft vocabulary must be >= 0 tokens (0: all), got {self.draft_vocab}")


def _rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on [N, S, heads, D] with cos/sin [1, S, 1, D] (the rotate-half convention of Llama)."""
    half = t.shape[-1] // 2
    rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
    return t * cos + rotated * sin


class DraftLayer(nn.Module):
    """A Llama decoder layer whose queries are the block and whose keys/values are [context | block]."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, eps: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.eps = heads, kv_heads, head_dim, eps
        self.input_norm = nn.Parameter(torch.ones(hidden))
        self.context_norm = nn.Parameter(torch.ones(hidden))
        self.post_norm = nn.Parameter(torch.ones(hidden))
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def _norm(self, x, weight):
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)

    def copy_from(self, layer: nn.Module) -> None:
        """Start from a parent decoder layer's weights (same shapes): sensible scales from step 0."""
        attn, mlp = layer.self_attn, layer.mlp
        with torch.no_grad():
            for mine, theirs in ((self.q_proj, attn.q_proj), (self.k_proj, attn.k_proj), (self.v_proj, attn.v_proj),
                                 (self.o_proj, attn.o_proj), (self.gate_proj, mlp.gate_proj),
                                 (self.up_proj, mlp.up_proj), (self.down_proj, mlp.down_proj)):
                mine.weight.copy_(theirs.weight)
            self.input_norm.copy_(layer.input_layernorm.weight)
            self.context_norm.copy_(layer.input_layernorm.weight)
            self.post_norm.copy_(layer.post_attention_layernorm.weight)

    def forward(self, x, context, visible, cos, sin):
        """x [N, B, H] (the block), context [N, W, H], visible [N, 1, 1, W + B] bool, cos/sin [1, W + B, 1, D]."""
        n, b, _ = x.shape
        w = context.shape[1]
        h = self._norm(x, self.input_norm)
        c = self._norm(context, self.context_norm)
        q = _rope(self.q_proj(h).view(n, b, self.heads, self.head_dim), cos[:, w:], sin[:, w:])
        keys = torch.cat([self.k_proj(c), self.k_proj(h)], dim=1).view(n, w + b, self.kv_heads, self.head_dim)
        values = torch.cat([self.v_proj(c), self.v_proj(h)], dim=1).view(n, w + b, self.kv_heads, self.head_dim)
        keys = _rope(keys, cos, sin)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=visible, enable_gqa=self.heads != self.kv_heads)
        x = x + self.o_proj(att.transpose(1, 2).reshape(n, b, self.heads * self.head_dim))
        h = self._norm(x, self.post_norm)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class FeatureDrafter(nn.Module):
    """The trained part: fuse projection, draft layers, final norm (the mask embedding lives on the dLM)."""

    def __init__(self, parent_config, cfg: FeatureDrafterConfig):
        super().__init__()
        hidden = parent_config.hidden_size
        heads = parent_config.num_attention_heads
        head_dim = getattr(parent_config, "head_dim", None) or hidden // heads
        eps = getattr(parent_config, "rms_norm_eps", 1e-6)
        self.cfg, self.eps = cfg, eps
        self.fuse = nn.Linear(len(cfg.feature_layers) * hidden, hidden, bias=False)
        self.layers = nn.ModuleList(
            DraftLayer(hidden, heads, parent_config.num_key_value_heads, head_dim, parent_config.intermediate_size,
                       eps) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(hidden))

    def forward(self, features, valid, block, cos, sin, index=None):
        """features [N, W, F] (raw parent features), valid [N, W] bool, block [N, B, H] embeddings: the normed final
        hidden states of the block [N, B, H]. With `index` [N, W], `features` [P, F] holds each distinct position
        once (training: windows overlap) and the windows are gathered after the fuse projection."""
        context = self.fuse(features.to(self.fuse.weight.dtype))
        if index is not None:
            context = context[index]
        n, b = block.shape[:2]
        visible = torch.cat([valid, valid.new_ones(n, b)], dim=1)[:, None, None, :]
        x = block
        for layer in self.layers:
            x = layer(x, context, visible, cos, sin)
        return F.rms_norm(x, (x.shape[-1],), self.norm, self.eps)


class FeatureDrafterLM(BlockDiffusionLM):
    """The unchanged parent plus a feature drafter: `verify` checks drafts with the parent, drafts with the drafter."""

    drafts_from_features = True

    def __init__(self, backbone: nn.Module, config: DLMConfig, drafter_cfg: FeatureDrafterConfig):
        if not config.token_shift:
            raise Ar2dlmError("a drafter needs token shift: its drafts extend the parent's own next token")
        if config.block_size < 2:
            raise Ar2dlmError("a feature drafter needs a block of at least 2 (the last token and one draft)")
        config.drafter, config.clean_attention = True, "token_causal"
        super().__init__(backbone, config)
        drafter_cfg.check(backbone.config.num_hidden_layers)
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.drafter_cfg = drafter_cfg
        self.drafter = FeatureDrafter(backbone.config, drafter_cfg).to(self.mask_embedding.device)
        layers = backbone.get_decoder().layers
        for i, layer in enumerate(self.drafter.layers):  # the parent's top layers, in order
            layer.copy_from(layers[len(layers) - len(self.drafter.layers) + i])
        with torch.no_grad():
            self.drafter.norm.copy_(backbone.get_decoder().norm.weight)
        # the draft vocabulary (its token ids; all tokens until set_draft_vocab) and its rows of the parent's head
        self.register_buffer("draft_vocab", torch.zeros(drafter_cfg.draft_vocab, dtype=torch.long))

    def set_draft_vocab(self, token_ids: torch.Tensor) -> None:
        """Draft only these tokens: the LM head shrinks to their rows (the drafts' head costs K / V of the full one),
        and a draft is never a token outside them."""
        token_ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        if token_ids.numel() != self.drafter_cfg.draft_vocab:
            raise Ar2dlmError(f"a draft vocabulary of {self.drafter_cfg.draft_vocab} tokens was configured, got "
                              f"{token_ids.numel()}")
        self.draft_vocab = token_ids.to(self.mask_embedding.device)
        self.__dict__.pop("_draft_head_key", None)

    def draft_head(self) -> nn.Linear:
        """The LM-head rows of the draft vocabulary as a frozen linear layer [H -> K], taken once from the parent's
        head (of its class too: a oneDNN-packed head, `model/packed_linear.py`, makes a packed draft head). Kept off
        the module tree: it is derived, never saved or trained."""
        parent = self.backbone.get_output_embeddings()
        weight = parent.weight
        key = (weight.device, weight.dtype, type(parent), weight._version)
        if self.__dict__.get("_draft_head_key") != key:
            head = nn.Linear(weight.shape[1], self.draft_vocab.numel(), bias=False, device=weight.device,
                             dtype=weight.dtype)
            head.weight.requires_grad_(False)
            with torch.no_grad():
                head.weight.copy_(weight[self.draft_vocab.to(weight.device)])
            if isinstance(parent, nn.Linear):
                head.__class__ = type(parent)
            self.__dict__["_draft_head"], self.__dict__["_draft_head_key"] = head, key
        return self.__dict__["_draft_head"]

    def draft_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary [..., K] (the full vocabulary, mask token ruled out, when it is all)."""
        if not self.drafter_cfg.draft_vocab:
            return self.logits(hidden)
        return self.draft_head()(hidden)

    def to_draft_vocab(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> their index in the draft vocabulary (-1 outside it); identity when it is all tokens."""
        if not self.drafter_cfg.draft_vocab:
            return token_ids
        lookup = torch.full((self.backbone.get_input_embeddings().weight.shape[0],), -1, dtype=torch.long,
                            device=token_ids.device)
        lookup[self.draft_vocab.to(token_ids.device)] = torch.arange(self.draft_vocab.numel(), device=token_ids.device)
        return torch.where(token_ids >= 0, lookup[token_ids.clamp(min=0)], token_ids)

    @classmethod
    def from_base(cls, backbone, tokenizer, block_size: int = 8, base_model: str | None = None,
                  feature_layers: list[int] | None = None, num_layers: int = 2, window: int = 32,
                  draft_vocab: int = 0, mask_token: str | None = None) -> "FeatureDrafterLM":
        mask_id = add_mask_token(backbone, tokenizer, mask_token)
        layers = feature_layers or default_feature_layers(backbone.config.num_hidden_layers)
        cfg = DLMConfig(block_size=block_size, mask_token_id=mask_id, token_shift=True, base_model=base_model)
        return cls(backbone, cfg, FeatureDrafterConfig(list(layers), num_layers, window, draft_vocab))

    @property
    def feature_dim(self) -> int:
        return len(self.drafter_cfg.feature_layers) * self.hf_config.hidden_size

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    # ----------------------------------------------------------------------------------------- the parent side
    def parent_features(self, hidden_states) -> torch.Tensor:
        """The drafter's input [N, L, F] from Hugging Face's `hidden_states` tuple (entry i: after i layers)."""
        return torch.cat([hidden_states[i] for i in self.drafter_cfg.feature_layers], dim=-1)

    @torch.no_grad()
    def features_of(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The parent's features [N, L, F] over whole sequences (plain causal forward; right padding is harmless)."""
        out = self.decoder_output(input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        return self.parent_features(out.hidden_states)

    # ------------------------------------------------------------------------------------------ the draft side
    def _rotary(self, length: int):
        """RoPE cos/sin [1, length, 1, D] of the local positions 0..length-1 (the same every call: cached)."""
        cache = self.__dict__.setdefault("_rotary_cache", {})
        key = (length, self.device, self.mask_embedding.dtype)
        if key not in cache:
            with torch.no_grad():
                pos = torch.arange(length, device=self.device)[None]
                cos, sin = self.backbone.get_decoder().rotary_emb(self.mask_embedding[None, None], pos)
            dtype = self.mask_embedding.dtype
            cache[key] = (cos[:, :, None, :].to(dtype), sin[:, :, None, :].to(dtype))
        return cache[key]

    def draft_hidden(self, features: torch.Tensor, valid: torch.Tensor, anchors: torch.Tensor,
                     drafts: int | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [N, drafts, H] of the mask slots of blocks [anchor, mask x drafts] after the context
        `features` [N, W, F] (slots where `valid` [N, W] is False are not read; with `index` [N, W], features [P, F]
        gathered by it). drafts: block size - 1 by default."""
        drafts = self.config.block_size - 1 if drafts is None else drafts
        n, window = valid.shape
        block = torch.cat([self.backbone.get_input_embeddings()(anchors)[:, None],
                           self.mask_embedding.expand(n, drafts, -1)], dim=1)
        cos, sin = self._rotary(window + drafts + 1)
        return self.drafter(features, valid, block, cos, sin, index)[:, 1:]

    @torch.no_grad()
    def draft_logits(self, features, valid, anchors, drafts: int | None = None) -> torch.Tensor:
        """Logits [N, drafts, V] over the parent's vocabulary of the drafts after each anchor: the mask token and
        tokens outside the draft vocabulary ruled out (-inf)."""
        scores = self.draft_scores(self.draft_hidden(features, valid, anchors, drafts))
        if not self.drafter_cfg.draft_vocab:
            return scores
        vocab = self.backbone.get_input_embeddings().weight.shape[0]
        out = scores.new_full((*scores.shape[:-1], vocab), float("-inf"))
        return out.index_copy_(-1, self.draft_vocab, scores)

    # ------------------------------------------------------------------------------------------- save / load
    def drafter_state(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        state = {f"drafter.{k}": v.detach().to("cpu", dtype).contiguous() for k, v in self.drafter.state_dict().items()}
        state["mask_embedding"] = self.mask_embedding.detach().to("cpu", dtype).contiguous()
        state["draft_vocab"] = self.draft_vocab.detach().cpu().contiguous()  # token ids: never cast
        return state

    def save_pretrained(self, path: str | os.PathLike, tokenizer=None, base_model: str | None = None,
                        dtype: torch.dtype = torch.float32) -> None:
        """A drafter folder; `dtype` float16 halves the file (loading casts back to the model's dtype)."""
        from ar2dlm.drafter.folder import save_drafter_folder

        save_drafter_folder(self, path, WEIGHTS_FILE, self.drafter_state(dtype),
                            {"drafter_kind": KIND, "feature_drafter": asdict(self.drafter_cfg)}, tokenizer, base_model)

    def load_drafter_state(self, state: dict[str, torch.Tensor], where: str, vocab: bool = True) -> None:
        """Load saved weights; `vocab` False keeps this model's draft vocabulary (the weights do not depend on it:
        the draft head is rows of the parent's frozen head, so a run on new data may draft its own most frequent
        tokens with weights it continues from)."""
        state = dict(state)
        own = {f"drafter.{k}": v for k, v in self.drafter.state_dict().items()}
        own["mask_embedding"] = self.mask_embedding
        if vocab:
            own["draft_vocab"] = self.draft_vocab
        else:
            state.pop("draft_vocab", None)
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
        if missing or extra or wrong:
            raise Ar2dlmError(f"{where}: feature drafter weights do not fit this parent (missing {missing[:3]}, "
                              f"unexpected {extra[:3]}, wrong shape {wrong[:3]})")
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(state[k].to(v.dtype))
        self.__dict__.pop("_draft_head_key", None)


def is_feature_drafter_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / WEIGHTS_FILE).is_file()


def read_feature_drafter_config(path: str | os.PathLike) -> dict:
    try:
        meta = json.loads((Path(path) / DLM_CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise Ar2dlmError(f"{path}: unreadable {DLM_CONFIG_FILE} ({e})") from None
    if meta.get("drafter_kind") != KIND or "feature_drafter" not in meta:
        raise Ar2dlmError(f"{path}: {DLM_CONFIG_FILE} does not describe a feature drafter")
    return meta


def load_feature_drafter(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu"):
    """A saved feature drafter on top of a fresh copy of its parent, and the drafter's tokenizer."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    path = Path(path)
    meta = read_feature_drafter_config(path)
    cfg = FeatureDrafterConfig(**meta["feature_drafter"])
    model = FeatureDrafterLM(load_parent(meta, dtype, device), DLMConfig.from_dict(meta["dlm"]), cfg)
    model.load_drafter_state(load_file(str(path / WEIGHTS_FILE)), str(path))
    return model.to(device=device, dtype=dtype), AutoTokenizer.from_pretrained(path)
