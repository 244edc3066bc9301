"""The block-diffusion LM: a Hugging Face causal-LM backbone plus the dLM settings and a mask token.

A saved dLM is a normal Hugging Face checkpoint of its backbone (safetensors, tokenizer with the mask token added)
whose config.json carries an extra `dlm` entry ({block_size, mask_token_id, token_shift}). A LoRA-converted dLM is a
peft adapter plus the mask-token embedding row and a `dlm_config.json` naming its base model; it loads on top of that
base. Each loads with `BlockDiffusionLM.from_pretrained(path)` and nothing but ar2dlm installed. A drafter folder
(ar2dlm/drafter/: gated or feature) is a small folder on top of its parent as well, loaded unmerged by
`ar2dlm.model.open.load_dlm(path)`, which loads any of these.

Token shift: on, the logit at position i predicts token i+1, so the AR head keeps its job (cheap conversion); the
first token of a block is then predicted by the clean copy's last position of the previous block, which at decode
time is the last logit of the forward that committed that block. Off, the logit at i predicts token i.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from ar2dlm.errors import Ar2dlmError
from ar2dlm.model import attention

DEFAULT_MASK_TOKEN = "<|mdm_mask|>"
DLM_CONFIG_FILE = "dlm_config.json"
MASK_ROW_FILE = "mask_embedding.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"


@functools.cache
def cache_keyword(decoder_class: type) -> str:
    """The name a decoder's forward takes its KV cache under: `cache` since transformers renamed it (the old
    `past_key_values` still works there, but prints a FutureWarning on every call), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(decoder_class.forward).parameters else "past_key_values"


def with_cache_keyword(decoder_class: type, kwargs: dict) -> dict:
    """`kwargs` with a `past_key_values` entry passed under the name this transformers release uses."""
    name = cache_keyword(decoder_class)
    if name == "past_key_values" or "past_key_values" not in kwargs:
        return kwargs
    kwargs = dict(kwargs)
    kwargs[name] = kwargs.pop("past_key_values")
    return kwargs


@dataclass
class DLMConfig:
    """The settings that make a causal LM a block-diffusion LM."""

    block_size: int = 4
    mask_token_id: int = -1
    token_shift: bool = True
    base_model: str | None = None  # the AR parent (embedded name, path or hub id), for side-by-side comparisons
    # A gated drafter (ar2dlm.drafter.gated) leaves its parent intact: clean positions are the parent's own
    # token-causal function, and only mask positions run the trained adapter. A full dLM's clean copy is block-causal.
    drafter: bool = False
    clean_attention: str = "block_causal"  # or "token_causal"

    def __post_init__(self):
        if self.block_size < 1:
            raise Ar2dlmError(f"block size must be >= 1, got {self.block_size}")
        if self.clean_attention not in ("block_causal", "token_causal"):
            raise Ar2dlmError(f"clean_attention must be block_causal or token_causal, got {self.clean_attention!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "DLMConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def is_drafter_checkpoint(path: str | os.PathLike) -> bool:
    """A saved drafter folder (gated or feature): its `dlm_config.json` settings say `drafter: true`. It loads on
    top of its parent through `ar2dlm.model.open.load_dlm`, not `BlockDiffusionLM.from_pretrained`."""
    try:
        meta = json.loads((Path(path) / DLM_CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("dlm"), dict) and bool(meta["dlm"].get("drafter"))


def _set_mean_row(backbone: nn.Module, row: int, n_real: int | None = None) -> None:
    """Set embedding row `row` (and the output row when untied) to the mean of the first `n_real` rows."""
    n_real = row if n_real is None else n_real
    with torch.no_grad():
        for table in {t.weight.data_ptr(): t for t in (backbone.get_input_embeddings(), backbone.get_output_embeddings())
                      if t is not None}.values():
            table.weight[row] = table.weight[:n_real].float().mean(0).to(table.weight.dtype)


def _mean_init_new_row(backbone: nn.Module, new_vocab: int) -> int:
    """Grow the vocabulary by one row initialised to the mean embedding (and mean output row when untied)."""
    old_vocab = backbone.get_input_embeddings().weight.shape[0]
    if new_vocab != old_vocab + 1:
        raise Ar2dlmError(f"tokenizer and model disagree on vocabulary size ({new_vocab - 1} vs {old_vocab})")
    backbone.resize_token_embeddings(new_vocab, mean_resizing=False)
    _set_mean_row(backbone, old_vocab)
    return old_vocab


def load_parent(meta: dict, dtype: torch.dtype, device) -> nn.Module:
    """A fresh copy of the parent that a saved adapter or drafter names (its `dlm_config.json` as `meta`), with the
    mask-token row it was saved with."""
    from ar2dlm.model.loading import load_base

    backbone, _ = load_base(meta["base_model"], dtype=dtype, device=device)
    if backbone.get_input_embeddings().weight.shape[0] < meta["vocab_size"]:
        _mean_init_new_row(backbone, meta["vocab_size"])
    return backbone


def add_mask_token(backbone: nn.Module, tokenizer, mask_token: str | None = None) -> int:
    """Give the backbone a mask token and return its id.

    `mask_token` names an existing vocabulary token to reuse (no new row, so a LoRA adapter needs nothing else);
    otherwise a new special token is added with its embedding set to the mean of the others, a neutral start that
    the model can move away from, unlike random noise.
    """
    if mask_token is not None:
        tok_id = tokenizer.convert_tokens_to_ids(mask_token)
        if tok_id is None or tok_id == tokenizer.unk_token_id or not isinstance(tok_id, int):
            raise Ar2dlmError(f"mask token {mask_token!r} is not in the vocabulary")
        return tok_id
    added = DEFAULT_MASK_TOKEN not in tokenizer.get_vocab()
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": [DEFAULT_MASK_TOKEN]},
                                     replace_extra_special_tokens=False)
    tok_id = tokenizer.convert_tokens_to_ids(DEFAULT_MASK_TOKEN)
    rows = backbone.get_input_embeddings().weight.shape[0]
    if tok_id == rows:  # a new row (also when the tokenizer already had the token from an earlier conversion)
        _mean_init_new_row(backbone, rows + 1)
    elif tok_id < rows and added:  # a padded vocabulary (e.g. Qwen) has spare rows: reuse one, mean-initialised
        _set_mean_row(backbone, tok_id)
    elif tok_id > rows:
        raise Ar2dlmError(f"mask token id {tok_id} is beyond the model's {rows} embedding rows")
    return tok_id


class BlockDiffusionLM(nn.Module):
    """A causal-LM backbone run with block-diffusion attention.

    The mask token's input embedding is kept as its own parameter (`mask_embedding`), so that LoRA conversion can
    train it without unfreezing the whole embedding matrix; it is written back into the vocabulary row on save.
    """

    def __init__(self, backbone: nn.Module, config: DLMConfig):
        super().__init__()
        self.backbone = backbone
        self.config = config
        vocab = backbone.get_input_embeddings().weight.shape[0]
        if not 0 <= config.mask_token_id < vocab:
            raise Ar2dlmError(f"mask token id {config.mask_token_id} outside the vocabulary (size {vocab})")
        row = backbone.get_input_embeddings().weight[config.mask_token_id].detach().clone()
        self.mask_embedding = nn.Parameter(row)
        self._peft_model = None  # set by apply_lora; kept off the module tree so weights are not registered twice

    # ----------------------------------------------------------------------------------------------------- build
    @classmethod
    def from_base(
        cls,
        backbone: nn.Module,
        tokenizer,
        block_size: int = 4,
        token_shift: bool = True,
        mask_token: str | None = None,
        base_model: str | None = None,
    ) -> "BlockDiffusionLM":
        mask_id = add_mask_token(backbone, tokenizer, mask_token)
        cfg = DLMConfig(block_size=block_size, mask_token_id=mask_id, token_shift=token_shift, base_model=base_model)
        return cls(backbone, cfg)

    @property
    def device(self) -> torch.device:
        return self.mask_embedding.device

    @property
    def hf_config(self):
        return self.backbone.config

    def apply_lora(self, rank: int = 16, alpha: int = 32, dropout: float = 0.0, target_modules=None) -> None:
        """Freeze the backbone and inject LoRA adapters into its linear layers (the mask embedding stays trainable)."""
        from peft import LoraConfig, get_peft_model

        targets = target_modules or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
        try:
            peft_model = get_peft_model(self.backbone, cfg)
        except ValueError as e:
            raise Ar2dlmError(f"cannot apply LoRA to this model: {e}") from None
        self.backbone = peft_model.get_base_model()  # the same modules, with LoRA layers injected in place
        self._peft_model = peft_model

    @property
    def is_lora(self) -> bool:
        return self._peft_model is not None

    def set_attention_backend(self, backend: str) -> None:
        """'sdpa' (dense boolean mask) or 'flex' (FlexAttention block mask)."""
        impl = {"sdpa": "sdpa", "flex": "flex_attention"}.get(backend)
        if impl is None:
            raise Ar2dlmError(f"unknown attention backend {backend!r} (choose sdpa or flex)")
        self.backbone.set_attn_implementation(impl)

    @property
    def attention_backend(self) -> str:
        return "flex" if self.backbone.config._attn_implementation == "flex_attention" else "sdpa"

    # --------------------------------------------------------------------------------------------------- forward
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        emb = self.backbone.get_input_embeddings()(input_ids)
        is_mask = (input_ids == self.config.mask_token_id)[..., None]
        return torch.where(is_mask, self.mask_embedding.to(emb.dtype), emb)

    def _decoder(self):
        return self.backbone.get_decoder()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits with the mask token ruled out (it is never a valid prediction)."""
        out = self.backbone.get_output_embeddings()(hidden)
        out[..., self.config.mask_token_id] = torch.finfo(out.dtype).min
        return out

    def training_hidden(
        self, noisy_ids: torch.Tensor, clean_ids: torch.Tensor, lengths: torch.Tensor | None = None,
        block_size: int | None = None,
    ) -> torch.Tensor:
        """Final hidden states of the [noisy | clean] layout, shape [N, 2L, H]; `block_size` overrides the
        configured one (distillation can grow the block size over training)."""
        n, seq_len = clean_ids.shape
        block_size = block_size or self.config.block_size
        ids = torch.cat([noisy_ids, clean_ids], dim=1)
        pos = attention.layout_position_ids(seq_len, ids.device).expand(n, -1)
        mask = self.layout_mask(seq_len, block_size, lengths, ids.device)
        return self.decoder_output(ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state

    def layout_mask(self, seq_len: int, block_size: int, lengths: torch.Tensor | None, device):
        """The attention mask of the [noisy | clean] layout for this model's attention backend (the gated drafter
        has its own: a token-causal clean copy)."""
        if self.attention_backend == "flex":
            return attention.flex_mask(seq_len, block_size, lengths, device=device)
        return attention.dense_mask(seq_len, block_size, lengths, device=device)

    def predictor_hidden(self, hidden: torch.Tensor, block_size: int | None = None) -> torch.Tensor:
        """For each position p of the sequence, the hidden state whose logit predicts token p: shape [N, L, H].

        Token shift off: the noisy copy at p. On: the noisy copy at p-1 inside a block, and at a block's first
        position the clean copy at p-1 (the only state that sees exactly the earlier blocks). Position 0 has no
        predictor under token shift; its row is a copy of position 0 and must not be scored.
        """
        seq_len = hidden.shape[1] // 2
        noisy, clean = hidden[:, :seq_len], hidden[:, seq_len:]
        if not self.config.token_shift:
            return noisy
        pos = torch.arange(seq_len, device=hidden.device)
        prev = (pos - 1).clamp(min=0)
        block_start = (pos % (block_size or self.config.block_size) == 0)[None, :, None]
        return torch.where(block_start, clean[:, prev], noisy[:, prev])

    def diffusion_logits(
        self,
        noisy_ids: torch.Tensor,
        clean_ids: torch.Tensor,
        scored: torch.Tensor,
        lengths: torch.Tensor | None = None,
        block_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and targets at the `scored` positions (bool [N, L]): returns ([M, V], [M]).

        Only scored positions go through the LM head, which for a large vocabulary is most of the memory.
        """
        if self.config.token_shift and scored[:, 0].any():
            raise ValueError("position 0 cannot be scored with token shift on (nothing predicts it)")
        hidden = self.predictor_hidden(self.training_hidden(noisy_ids, clean_ids, lengths, block_size), block_size)
        return self.logits(hidden[scored]), clean_ids[scored]

    def decoder_output(self, input_ids: torch.Tensor, **kwargs):
        """The backbone's decoder (no LM head) on `input_ids`; kwargs go to it (attention_mask, position_ids,
        past_key_values, use_cache, ...). The decoding engine's model runner calls this, so a subclass that must see
        the fed ids (the gated drafter) hooks in here."""
        decoder = self._decoder()
        return decoder(inputs_embeds=self.embed(input_ids), **with_cache_keyword(type(decoder), kwargs))

    def forward(self, input_ids: torch.Tensor, **kwargs):
        """Plain causal-LM style call (used by decoders): logits for every position, mask token ruled out."""
        out = self.decoder_output(input_ids, **kwargs)
        return self.logits(out.last_hidden_state), out

    # ------------------------------------------------------------------------------------------------ save/load
    def _sync_mask_row(self) -> None:
        with torch.no_grad():
            self.backbone.get_input_embeddings().weight[self.config.mask_token_id] = self.mask_embedding.to(
                self.backbone.get_input_embeddings().weight.dtype
            )

    def save_pretrained(self, path: str | os.PathLike, tokenizer=None, base_model: str | None = None) -> None:
        """Write a Hugging Face checkpoint (full) or an adapter folder (LoRA) atomically: temp folder, then rename."""
        from ar2dlm.utils.files import atomic_dir

        with atomic_dir(path) as tmp:
            if self.is_lora:
                from safetensors.torch import save_file

                base_model = base_model or self.config.base_model
                if base_model is None:
                    raise Ar2dlmError("saving a LoRA dLM needs the base model it loads on top of")
                # peft would otherwise save the whole (resized) embedding matrix; the mask row is all that is
                # new, it is written below and re-created on load.
                self._peft_model.save_pretrained(tmp, save_embedding_layers=False)
                save_file({"mask_embedding": self.mask_embedding.detach().float().cpu().contiguous()},
                          str(Path(tmp) / MASK_ROW_FILE))
                meta = {"dlm": asdict(self.config), "base_model": base_model,
                        "vocab_size": self.backbone.get_input_embeddings().weight.shape[0]}
                (Path(tmp) / DLM_CONFIG_FILE).write_text(json.dumps(meta, indent=2))
            else:
                self._sync_mask_row()
                self.backbone.config.dlm = asdict(self.config)
                if getattr(self.backbone.config, "quantization_config", None) is not None:
                    del self.backbone.config.quantization_config  # dequantized weights: not a GGUF any more
                self.backbone.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
        merge_lora: bool = True,
    ) -> tuple["BlockDiffusionLM", object]:
        """Load a saved full or LoRA dLM (a folder or a shipped dLM's name) and its tokenizer. A drafter folder
        (gated or feature) is refused: `ar2dlm.model.open.load_dlm` loads any of them."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ar2dlm.model.loading import resolve_dlm_path

        path = resolve_dlm_path(path)
        if not path.is_dir():
            raise Ar2dlmError(f"no dLM checkpoint at {path}")
        if is_drafter_checkpoint(path):
            raise Ar2dlmError(f"{path} is a drafter folder: load it with ar2dlm.model.open.load_dlm")
        tokenizer = AutoTokenizer.from_pretrained(path)
        if (path / ADAPTER_CONFIG_FILE).exists():
            from peft import PeftModel
            from safetensors.torch import load_file

            meta = json.loads((path / DLM_CONFIG_FILE).read_text())
            backbone = load_parent(meta, dtype, device)
            cfg = DLMConfig.from_dict(meta["dlm"])
            peft_model = PeftModel.from_pretrained(backbone, str(path))
            row = load_file(str(path / MASK_ROW_FILE))["mask_embedding"]
            if merge_lora:
                model = cls(peft_model.merge_and_unload(), cfg)
            else:
                model = cls(peft_model.get_base_model(), cfg)
                model._peft_model = peft_model
            with torch.no_grad():
                model.mask_embedding.copy_(row.to(model.mask_embedding.dtype))
            return model.to(device), tokenizer
        if not (path / "config.json").exists():
            raise Ar2dlmError(f"{path} holds neither a dLM checkpoint (config.json) nor a LoRA adapter")
        backbone = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        dlm = getattr(backbone.config, "dlm", None)
        if not isinstance(dlm, dict):
            raise Ar2dlmError(f"{path} is a plain causal LM, not a dLM (its config has no 'dlm' entry)")
        return cls(backbone, DLMConfig.from_dict(dlm)).to(device), tokenizer
