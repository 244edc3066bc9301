"""`ar2dlm generate`: the command on a tiny dLM and a plain AR folder, and its bad options."""

from __future__ import annotations

import pytest

from ar2dlm.model.dlm import BlockDiffusionLM, add_mask_token
from ar2dlm.testing import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer()
    add_mask_token(tiny_model("llama", vocab_size=len(t)), t)
    return t


def _dlm(tok, block_size=4):
    return BlockDiffusionLM.from_base(tiny_model("llama", seed=0, vocab_size=len(tok)), tok,
                                      block_size=block_size).eval()


def test_generate_cli(tmp_path, tok, capsys):
    from ar2dlm.cli import main
    from ar2dlm.testing import tiny_base

    base = tiny_base(tmp_path)
    dlm = _dlm(tok, block_size=4)
    dlm.save_pretrained(tmp_path / "dlm", tok)
    assert main(["generate", "--model", str(tmp_path / "dlm"), "--prompt", "the quick", "--max-new-tokens", "8",
                 "--tau", "0.0", "--chat", "--block-parallel", "--stream"]) == 0
    out = capsys.readouterr()
    assert "NFE" in out.err and "TPF" in out.err and "TTFT" in out.err
    # a plain AR folder runs as a block-size-1 dLM: one token per forward
    assert main(["generate", "--model", str(base), "--prompt", "the quick", "--max-new-tokens", "6",
                 "--policy", "ar", "--json-out", str(tmp_path / "g.json")]) == 0
    out = capsys.readouterr()
    assert "TPF 1.00" in out.err
    assert main(["generate", "--model", str(base), "--prompt", "x", "--tau", "2"]) == 2
    assert "tau" in capsys.readouterr().err


@pytest.mark.parametrize("extra, chat", [([], True), (["--chat"], True), (["--raw"], False)])
def test_generate_applies_the_chat_template_unless_raw(tmp_path, capsys, monkeypatch, extra, chat):
    """An instruct model given bare text mostly ends its turn at once (issue 13: blank output), so the template is
    the default where the tokenizer has one; --raw is the plain continuation, --chat is still accepted."""
    from ar2dlm.cli import main
    from ar2dlm.recipes import generate
    from ar2dlm.testing import tiny_base

    encoded = []
    monkeypatch.setattr(generate, "encode_prompt", lambda tok, text, chat: encoded.append(chat) or [5, 6, 7])
    assert main(["generate", "--model", str(tiny_base(tmp_path)), "--prompt", "hi", "--policy", "ar",
                 "--max-new-tokens", "2", *extra]) == 0
    assert encoded == [chat]


def test_generate_without_a_template_continues_the_text(tok):
    from ar2dlm.recipes.generate import GenerateConfig

    plain = tiny_tokenizer()
    plain.chat_template = None
    assert not GenerateConfig(model="m", prompt="p").use_chat_template(plain)
    assert GenerateConfig(model="m", prompt="p", chat=True).use_chat_template(plain)  # then encode_prompt refuses
    assert GenerateConfig(model="m", prompt="p").use_chat_template(tok)


@pytest.mark.parametrize("extra, message", [
    (["--json-out", "{tmp}"], "--json-out"),  # a folder: refused before the model loads, not after the answer
    (["--json-out", "{tmp}/a_file/g.json"], "is a file, not a folder"),
    (["--stop", ""], "--stop must be non-empty"),  # was silently ignored
    (["--chat", "--raw"], "--chat and --raw exclude each other"),
])
def test_generate_cli_bad_options_fail_before_loading(tmp_path, capsys, extra, message):
    from ar2dlm.cli import main

    (tmp_path / "a_file").write_text("x")
    extra = [a.format(tmp=tmp_path) for a in extra]
    assert main(["generate", "--model", str(tmp_path / "no-such-model"), "--prompt", "x", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ar2dlm: error: ") and message in err[0], err


def test_a_gated_drafter_generates_the_parents_text_by_default(tmp_path, capsys):
    """Without --policy a gated drafter decodes with its lossless verify: the parent's own greedy tokens, whatever
    its adapter; --policy threshold is still obeyed."""
    import json

    import torch

    from ar2dlm.cli import main
    from ar2dlm.drafter.gated import GatedDrafterLM, GatedLoRALinear
    from ar2dlm.engine import Engine
    from ar2dlm.model.loading import load_base
    from ar2dlm.model.open import open_for_decoding
    from ar2dlm.testing import tiny_base

    base = tiny_base(tmp_path)
    model, tok = load_base(str(base))
    drafter = GatedDrafterLM.from_base(model, tok, block_size=4, base_model=str(base), rank=2)
    torch.manual_seed(0)
    with torch.no_grad():
        for m in drafter.modules():
            if isinstance(m, GatedLoRALinear):
                m.lora_B.normal_(0, 0.5)
    drafter.save_pretrained(tmp_path / "drafter", tok)
    parent, parent_tok, _ = open_for_decoding(str(base))
    out = tmp_path / "g.json"
    assert main(["generate", "--model", str(tmp_path / "drafter"), "--prompt", "the quick", "--raw",
                 "--max-new-tokens", "10", "--json-out", str(out)]) == 0
    assert "policy verify" in capsys.readouterr().err
    expected = Engine(parent, parent_tok).generate("the quick", policy="ar", max_new_tokens=10)
    assert json.loads(out.read_text())["text"] == expected.text
    assert main(["generate", "--model", str(tmp_path / "drafter"), "--prompt", "the quick", "--raw",  # verify-only
                 "--max-new-tokens", "10", "--draft-every-length", "--json-out", str(out)]) == 0  # settings
    assert json.loads(out.read_text())["text"] == expected.text
    assert main(["generate", "--model", str(tmp_path / "drafter"), "--prompt", "the quick", "--raw",
                 "--max-new-tokens", "10", "--policy", "threshold"]) == 0
    assert "policy threshold" in capsys.readouterr().err
