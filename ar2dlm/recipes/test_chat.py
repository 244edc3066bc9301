"""`ar2dlm chat` on tiny saved models, driven through stdin: history, /reset, /quit, EOF, the context window."""

from __future__ import annotations

import io
import sys

import pytest

from ar2dlm.cli import main
from ar2dlm.engine import Engine
from ar2dlm.model.dlm import BlockDiffusionLM
from ar2dlm.testing import tiny_base, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    tok = tiny_tokenizer()
    dlm = BlockDiffusionLM.from_base(tiny_model("llama", vocab_size=len(tok)), tok, block_size=4)
    dlm.save_pretrained(tmp / "dlm", tok)
    return {"dlm": tmp / "dlm", "ar": tiny_base(tmp), "tok": tok}


class _Prompts(list):
    def __init__(self):
        super().__init__()
        self.lengths: list[int] = []


def _chat(monkeypatch, capsys, argv: list[str], lines: str):
    """Run `ar2dlm chat` with `lines` on stdin; returns (exit code, prompts decoded, stdout, stderr). The prompts
    list also gets a `lengths` attribute: their token counts."""
    prompts = _Prompts()
    original = Engine.stream

    def recording_stream(self, prompt, config=None, **overrides):
        prompts.append(self.tokenizer.decode(prompt))
        prompts.lengths.append(len(prompt))
        return original(self, prompt, config, **overrides)

    monkeypatch.setattr(Engine, "stream", recording_stream)
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    code = main(["chat", *argv])
    out = capsys.readouterr()
    return code, prompts, out.out, out.err


def test_history_reset_and_quit(models, monkeypatch, capsys):
    code, prompts, out, err = _chat(
        monkeypatch, capsys, ["--model", str(models["dlm"]), "--max-new-tokens", "6", "--tau", "0.5",
                              "--system", "be brief"],
        "the quick brown fox\n\n0 1 2 3\n/reset\ndef add(a, b):\n/quit\nnever read\n")
    assert code == 0
    assert len(prompts) == 3
    first, second, third = prompts
    assert first.startswith("<|im_start|>system\nbe brief<|im_end|>")
    assert "the quick brown fox" in first and first.endswith("<|im_start|>assistant\n")
    # the second turn's prompt holds the whole first turn (question and answer), then the new question
    assert second.startswith(first) and second.count("<|im_start|>assistant") == 2 and "0 1 2 3" in second
    # after /reset: the system message and the new question only
    assert "the quick brown fox" not in third and "0 1 2 3" not in third and "be brief" in third
    assert "def add(a, b):" in third
    assert err.count("NFE") == 3 and err.count("TPF") == 3 and err.count("TTFT") == 3 and "tokens/s" in err
    assert "history cleared" in err
    assert "\x1b[" not in err  # dim only on a terminal


def test_ar_parent_and_end_of_input(models, monkeypatch, capsys):
    code, prompts, out, err = _chat(monkeypatch, capsys, ["--model", str(models["ar"]), "--policy", "ar",
                                                          "--max-new-tokens", "5"], "hello\n/what\nagain\n")
    assert code == 0 and len(prompts) == 2  # EOF ends the chat
    assert "unknown command /what" in err and "TPF 1.00" in err


def test_long_history_drops_the_oldest_turns(models, monkeypatch, capsys):
    """The tiny models have a 256-token context: with 100 new tokens, long questions soon crowd out old turns."""
    long = " ".join(["the quick brown fox"] * 4)  # about 55 tokens with the chat template
    lines = "".join(f"{i} {long}\n" for i in range(4)) + ("x " * 400) + "\nlast question\n"
    code, prompts, out, err = _chat(monkeypatch, capsys, ["--model", str(models["dlm"]), "--max-new-tokens", "100",
                                                          "--tau", "0.0"], lines)
    assert code == 0 and len(prompts) == 5
    assert "dropped the oldest" in err
    assert all(n + 100 <= 256 for n in prompts.lengths)
    assert "0 the quick" in prompts[0] and "0 the quick" not in prompts[-2]
    assert "context window is 256" in err  # a message that cannot fit alone is refused, the chat goes on
    assert prompts[-1].endswith("last question<|im_end|>\n<|im_start|>assistant\n")


def test_bad_options_fail_before_loading(capsys):
    assert main(["chat", "--model", "nowhere", "--tau", "2"]) == 2
    assert "tau" in capsys.readouterr().err


def test_a_message_that_is_not_utf8_is_refused_and_the_chat_goes_on(models, monkeypatch, capsys):
    # undecodable bytes on a piped stdin arrive as lone surrogates; the tokenizer raised a TypeError on them
    code, prompts, out, err = _chat(monkeypatch, capsys, ["--model", str(models["dlm"]), "--max-new-tokens", "2"],
                                    "bad \udcff bytes\nhello\n")
    assert code == 0 and len(prompts) == 1 and "hello" in prompts[0]
    assert "ar2dlm: the text is not valid UTF-8" in err


def test_generate_prompt_that_is_not_utf8_is_one_line(models, capsys):
    assert main(["generate", "--model", str(models["dlm"]), "--prompt", "bad \udcff bytes"]) == 2
    assert capsys.readouterr().err.strip() == "ar2dlm: error: the text is not valid UTF-8"
