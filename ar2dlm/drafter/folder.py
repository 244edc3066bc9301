"""A saved drafter folder, whatever its kind: its trained weights, `dlm_config.json` naming the parent it loads on
top of, and its tokenizer, written atomically (a temporary folder renamed into place)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.dlm import DLM_CONFIG_FILE


def save_drafter_folder(dlm, path: str | os.PathLike, weights_file: str, state: dict[str, torch.Tensor],
                        meta: dict, tokenizer=None, base_model: str | None = None) -> None:
    """Write `state` as `weights_file` and `dlm_config.json` = {dlm, base_model, vocab_size} plus the kind's own
    `meta`; `base_model` defaults to the parent the drafter records."""
    from safetensors.torch import save_file

    from ar2dlm.utils.files import atomic_dir

    base_model = base_model or dlm.config.base_model
    if base_model is None:
        raise Ar2dlmError("saving a drafter needs the parent model it loads on top of")
    with atomic_dir(path) as tmp:
        save_file(state, str(Path(tmp) / weights_file))
        config = {"dlm": asdict(dlm.config), "base_model": base_model, **meta,
                  "vocab_size": dlm.backbone.get_input_embeddings().weight.shape[0]}
        (Path(tmp) / DLM_CONFIG_FILE).write_text(json.dumps(config, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

