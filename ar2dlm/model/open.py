"""Opening a model to decode with, the AR parent it came from, and the length of its context window.

Every command that decodes takes the same model argument: a converted dLM folder (full checkpoint, LoRA adapter,
gated or feature drafter) or any AR model spec (embedded name, folder, `.gguf`, hub id). An AR model runs as a
block-size-1 dLM, which is exactly the AR model (the `ar` policy reproduces its greedy decoding), so one engine
serves both and the parent of a comparison can be decoded the same way as its child. The wrapped AR model records
itself as its parent: a plain AR model compared with "its parent" is compared with itself.

`load_dlm` is the one loader of a saved dLM of any kind (full, LoRA, gated or feature drafter). It sits here, above
the dLM class, so that `ar2dlm.model.dlm` never imports the drafters built on it (`ar2dlm.drafter`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ar2dlm.drafter import feature, gated
from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.dlm import ADAPTER_CONFIG_FILE, DLM_CONFIG_FILE, BlockDiffusionLM, is_drafter_checkpoint

MODEL_SPEC_HELP = ("dLM folder or shipped dLM name (smollm2-135m-dlm); a plain AR model (folder, .gguf, embedded "
                   "name, hub id) runs as a block-size-1 dLM (use it with --policy ar)")


def load_dlm(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             merge_lora: bool = True) -> tuple[BlockDiffusionLM, object]:
    """Load a saved dLM (full, LoRA, gated or feature drafter; a folder or a shipped dLM's name) and its
    tokenizer. `merge_lora` applies to a LoRA dLM only: a drafter is never merged."""
    from ar2dlm.model.loading import resolve_dlm_path

    path = resolve_dlm_path(path)
    if not path.is_dir():
        raise Ar2dlmError(f"no dLM checkpoint at {path}")
    if feature.is_feature_drafter_folder(path):  # the unchanged parent plus a drafter on its hidden states
        return feature.load_feature_drafter(path, dtype=dtype, device=device)
    if gated.is_drafter_folder(path):  # gated: never merged, the gate keeps clean positions on the parent
        return gated.load_drafter(path, dtype=dtype, device=device)
    if is_drafter_checkpoint(path):
        raise Ar2dlmError(f"{path} is a drafter folder without its weights ({gated.DRAFTER_WEIGHTS_FILE} or "
                          f"{feature.WEIGHTS_FILE})")
    return BlockDiffusionLM.from_pretrained(path, dtype=dtype, device=device, merge_lora=merge_lora)


def is_dlm_folder(path: str | Path) -> bool:
    """A folder saved by ar2dlm as a dLM (or a shipped dLM's name): an adapter (LoRA or drafter) with its dLM
    settings, or a full checkpoint whose config.json carries the `dlm` entry."""
    from ar2dlm.model.loading import resolve_dlm_path

    path = resolve_dlm_path(path)
    if not path.is_dir():
        return False
    if (path / ADAPTER_CONFIG_FILE).exists() or (path / DLM_CONFIG_FILE).exists():
        return True
    try:
        return "dlm" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def check_not_run_folder(spec: str | Path, flag: str = "--model") -> None:
    """Refuse a training run's folder given where its model is meant (`runs/X` for `runs/X/model`): loading it
    would fail deep inside transformers ("Unrecognized model ... model_type")."""
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "config.json").exists() and not is_dlm_folder(path) and (
            is_dlm_folder(path / "model") or (path / "model" / "config.json").exists()):
        raise Ar2dlmError(f"{flag} {spec} is a run folder, not a model: did you mean {Path(spec) / 'model'}?")


def _looks_local(spec: str) -> bool:
    """A path rather than a hub id (`owner/name`) or an embedded name: a missing one is a typo, not a download."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or (
        "/" in spec and Path(spec.split("/")[0]).is_dir())


def open_for_decoding(spec: str, device=None, what: str = "model"):
    """(dLM, tokenizer, is_dlm), in eval mode on `device` (None: where it loads, the CPU). A dLM folder loads as
    saved; anything else loads as a base AR model wrapped as a block-size-1 dLM that records `spec` as its parent.
    `what` names the model in the error for a local path that does not exist ("AR parent")."""
    from ar2dlm.model.loading import EMBEDDED_DLMS, EMBEDDED_MODELS, load_base, resolve_dlm_path

    path = resolve_dlm_path(spec)
    if spec not in EMBEDDED_MODELS and spec not in EMBEDDED_DLMS and not path.exists() and _looks_local(spec):
        raise Ar2dlmError(f"{what} not found: {spec}")
    check_not_run_folder(spec, "--model" if what == "model" else what)
    target = "cpu" if device is None else device
    if is_dlm_folder(path):
        dlm, tokenizer = load_dlm(path, device=target)
        return dlm.eval(), tokenizer, True
    backbone, tokenizer = load_base(spec, device=target)
    dlm = BlockDiffusionLM.from_base(backbone, tokenizer, block_size=1, base_model=spec)
    return dlm.to(target).eval(), tokenizer, False


def parent_spec(dlm_or_config, base: str | None = None, missing: str = "pass --base") -> str:
    """The AR parent to compare with or score against: `base` when given (--base), else the one the dLM records.
    Raises with `missing` (what the user can do) when there is neither."""
    config = getattr(dlm_or_config, "config", dlm_or_config)
    spec = base or getattr(config, "base_model", None)
    if not spec:
        raise Ar2dlmError(f"the dLM does not record its AR parent: {missing}")
    return spec


def context_length(model_or_config) -> int | None:
    """The positions the model was trained for (Hugging Face `max_position_embeddings`), from a dLM, a Hugging Face
    model or its config; None when the config does not say."""
    for holder in (getattr(model_or_config, "hf_config", None), getattr(model_or_config, "config", None),
                   model_or_config):
        value = getattr(holder, "max_position_embeddings", None)
        if value:
            return int(value)
    return None
