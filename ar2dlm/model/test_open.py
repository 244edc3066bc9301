"""The one model opener: dLM folders as saved, AR models as block-size-1 dLMs, the parent, the context window."""

from __future__ import annotations

import pytest
import torch

from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.dlm import BlockDiffusionLM, DLMConfig
from ar2dlm.model.loading import load_base
from ar2dlm.model.open import (check_not_run_folder, context_length, is_dlm_folder, load_dlm, open_for_decoding,
                               parent_spec)
from ar2dlm.testing import tiny_base


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("open")
    base = tiny_base(root)
    model, tok = load_base(str(base))
    dlm = BlockDiffusionLM.from_base(model, tok, block_size=4, base_model=str(base))
    dlm.save_pretrained(root / "dlm", tok)
    model, tok = load_base(str(base))
    lora = BlockDiffusionLM.from_base(model, tok, block_size=4, base_model=str(base))
    lora.apply_lora(rank=2, alpha=4)
    lora.save_pretrained(root / "lora", tok)
    return {"base": base, "dlm": root / "dlm", "lora": root / "lora", "root": root}


def test_dlm_folders_open_as_saved(folders):
    for name in ("dlm", "lora"):
        assert is_dlm_folder(folders[name])
        dlm, tok, is_dlm = open_for_decoding(str(folders[name]))
        assert is_dlm and dlm.config.block_size == 4 and not dlm.training
        assert parent_spec(dlm) == str(folders["base"])
    assert not is_dlm_folder(folders["base"]) and not is_dlm_folder(folders["root"] / "nowhere")


def test_an_ar_model_is_a_block_size_one_dlm_and_its_own_parent(folders):
    dlm, tok, is_dlm = open_for_decoding(str(folders["base"]), device=torch.device("cpu"))
    assert not is_dlm and dlm.config.block_size == 1 and not dlm.training
    assert parent_spec(dlm) == str(folders["base"])
    assert parent_spec(dlm, base="other") == "other"  # --base wins


def test_missing_local_model_names_what_is_missing(tmp_path):
    with pytest.raises(Ar2dlmError, match="AR parent not found"):
        open_for_decoding(str(tmp_path / "gone"), what="AR parent")


def test_a_run_folder_given_as_the_model_points_at_its_model_folder(folders, tmp_path):
    run = tmp_path / "runs" / "X"
    run.mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    (run / "model").symlink_to(folders["dlm"], target_is_directory=True)
    with pytest.raises(Ar2dlmError, match=f"is a run folder, not a model: did you mean {run / 'model'}\\?"):
        open_for_decoding(str(run))
    check_not_run_folder(run / "model")  # the model folder itself, an AR folder and a missing path are fine
    check_not_run_folder(folders["base"])
    check_not_run_folder(tmp_path / "missing")


def test_a_dlm_without_a_recorded_parent_needs_base():
    with pytest.raises(Ar2dlmError, match="does not record its AR parent: pass --base"):
        parent_spec(DLMConfig())
    with pytest.raises(Ar2dlmError, match="or --no-ar"):
        parent_spec(DLMConfig(), missing="pass --base (or --no-ar)")
    assert parent_spec(DLMConfig(base_model="p")) == "p"


def test_context_length_of_a_dlm_a_model_and_a_config(folders):
    dlm, _, _ = open_for_decoding(str(folders["dlm"]))
    assert context_length(dlm) == context_length(dlm.backbone) == context_length(dlm.hf_config) == 256
    assert context_length(DLMConfig()) is None and context_length(object()) is None


def test_a_shipped_dlm_name_opens_its_folder_in_the_package(folders, monkeypatch):
    """A name in EMBEDDED_DLMS stands for its folder under the package root, wherever a dLM folder is accepted; a
    half-precision drafter loads back into a float32 model within half-precision rounding."""
    from ar2dlm.drafter.gated import GatedDrafterLM
    from ar2dlm.model import loading

    model, tok = load_base(str(folders["base"]))
    drafter = GatedDrafterLM.from_base(model, tok, block_size=4, base_model=str(folders["base"]), rank=2)
    with torch.no_grad():
        drafter.mask_embedding.normal_()
    root = folders["root"] / "shipped"
    drafter.save_pretrained(root / "tiny-dlm", tok, dtype=torch.float16)
    monkeypatch.setattr(loading, "EMBEDDED_DLMS", {"tiny-dlm": "test", "gone-dlm": "test"})
    monkeypatch.setattr(loading, "EMBEDDED_DLM_ROOT", root)
    assert is_dlm_folder("tiny-dlm")
    dlm, _, is_dlm = open_for_decoding("tiny-dlm")
    assert is_dlm and dlm.mask_embedding.dtype == torch.float32
    torch.testing.assert_close(dlm.mask_embedding, drafter.mask_embedding.half().float())
    assert load_dlm("tiny-dlm")[0].config.block_size == 4
    with pytest.raises(Ar2dlmError, match="missing"):
        open_for_decoding("gone-dlm")


@pytest.mark.parametrize("name", ["smollm2-135m-dlm", "smollm2-135m-gated-dlm"])
def test_the_shipped_dlms_are_in_the_package_and_small(name):
    """The shipped drafters (the default, a feature drafter, and the gated one before it): on the embedded parent,
    at most 20 MB, half-precision weights, with their training record."""
    import json

    from safetensors import safe_open

    from ar2dlm.model.loading import DEFAULT_DLM, EMBEDDED_DLMS, EMBEDDED_MODELS, resolve_dlm_path

    assert DEFAULT_DLM in EMBEDDED_DLMS
    folder = resolve_dlm_path(name)
    assert is_dlm_folder(folder)
    assert sum(f.stat().st_size for f in folder.iterdir()) <= 20 * 2 ** 20
    meta = json.loads((folder / "dlm_config.json").read_text())
    assert meta["base_model"] in EMBEDDED_MODELS and meta["dlm"]["token_shift"] and meta["dlm"]["drafter"]
    weights = folder / ("feature_drafter.safetensors" if meta.get("drafter_kind") == "feature" else "drafter.safetensors")
    with safe_open(str(weights), "pt") as f:
        kinds = {f.get_slice(k).get_dtype() for k in f.keys() if k != "draft_vocab"}  # token ids stay integers
        assert kinds == {"F16"}
    record = json.loads((folder / "training.json").read_text())
    assert record["command"].startswith("ar2dlm convert") and record["curve"]
