"""`ar2dlm chat`: an interactive, streaming, multi-turn chat with a dLM (or its AR parent with `--policy ar`).

Each turn renders the whole conversation (optional system message, earlier turns, the new user message) with the
tokenizer's chat template and decodes the answer with the cached engine, printing the text as forwards commit it.
After each answer a dim line on stderr gives tokens, NFE, TPF, tokens/s and TTFT. Commands: `/reset` clears the
history, `/quit` (or end of input, or Ctrl-C) leaves with status 0. When the conversation no longer fits the model's
context window together with `--max-new-tokens`, the oldest turns are dropped (and it says so).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import TextIO

from ar2dlm.engine import DecodeParams, Engine, GenerationResult, check_text
from ar2dlm.engine.params import add_decode_args, decode_params_from_args, for_model, policy_was_given
from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.open import MODEL_SPEC_HELP, open_for_decoding
from ar2dlm.utils.cli_config import add_dataclass_args, dataclass_from_args

HELP = "/reset clears the history, /quit (or Ctrl-D) leaves"


@dataclass(kw_only=True)
class ChatConfig:
    model: str = field(metadata={"help": MODEL_SPEC_HELP})
    system: str | None = field(default=None, metadata={"help": "system message at the start of the conversation"})
    decode: DecodeParams = field(default_factory=DecodeParams, metadata={"cli": False})
    policy_given: bool = field(default=True, metadata={"cli": False})  # False: the model's default policy


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, ChatConfig)
    add_decode_args(parser, defaults={"policy": None})


def config_from_args(args: argparse.Namespace) -> ChatConfig:
    given = policy_was_given(args)
    return dataclass_from_args(ChatConfig, args, decode=decode_params_from_args(args), policy_given=given)


class ChatSession:
    """The conversation: its turns, their rendering into prompt ids, and the context-window bookkeeping."""

    def __init__(self, engine: Engine, config: DecodeParams, system: str | None = None):
        tokenizer = engine.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise Ar2dlmError("chat needs a tokenizer with a chat template (for a plain continuation: ar2dlm "
                              "generate --raw)")
        self.engine, self.tokenizer, self.config, self.system = engine, tokenizer, config, system
        self.turns: list[tuple[str, str]] = []  # (user, assistant)

    def reset(self) -> None:
        self.turns.clear()

    def messages(self, user: str) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for u, a in self.turns:
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        return msgs + [{"role": "user", "content": user}]

    def _render(self, user: str) -> list[int]:
        check_text(user)
        return list(self.tokenizer.apply_chat_template(self.messages(user), add_generation_prompt=True,
                                                       tokenize=True, return_dict=True)["input_ids"])

    def prompt_ids(self, user: str) -> tuple[list[int], int]:
        """The prompt for the next answer and how many of the oldest turns were dropped (for good) to make the
        prompt and `max_new_tokens` fit the context window. Raises when the new message alone does not fit."""
        ids, dropped = self._render(user), 0
        context = self.engine.context
        if context is None:
            return ids, 0
        while self.turns and len(ids) + self.config.max_new_tokens > context:
            self.turns.pop(0)
            dropped += 1
            ids = self._render(user)
        if len(ids) >= context:
            raise Ar2dlmError(f"this message needs {len(ids)} tokens with the chat template; the context window is "
                              f"{context} tokens")
        return ids, dropped

    def answer(self, ids: list[int], user: str, out: TextIO) -> GenerationResult:
        """Stream the answer to `out`; the turn joins the history once the answer is complete."""
        stream = self.engine.stream(ids, self.config)
        for delta in stream:
            out.write(delta)
            out.flush()
        out.write("\n")
        out.flush()
        self.turns.append((user, stream.result.text))
        return stream.result


def _dim(text: str, stream: TextIO) -> str:
    return f"\x1b[2m{text}\x1b[0m" if stream.isatty() else text


def _read(stdin: TextIO, stdout: TextIO) -> str | None:
    """One line of input, None at the end of input."""
    if stdin.isatty() and stdin is sys.stdin and stdout is sys.stdout:
        try:
            return input("> ")  # line editing where readline is available
        except EOFError:
            return None
    line = stdin.readline()
    return None if line == "" else line.rstrip("\r\n")


def chat_loop(session: ChatSession, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    try:
        while True:
            line = _read(stdin, stdout)
            if line is None:
                break
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                command = text.split()[0].lower()
                if command in ("/quit", "/exit"):
                    break
                if command == "/reset":
                    session.reset()
                    print(_dim("(history cleared)", stderr), file=stderr, flush=True)
                else:
                    print(_dim(f"(unknown command {command}: {HELP})", stderr), file=stderr, flush=True)
                continue
            try:
                ids, dropped = session.prompt_ids(line)
            except Ar2dlmError as e:
                print(f"ar2dlm: {e}", file=stderr, flush=True)
                continue
            if dropped:
                print(_dim(f"(dropped the oldest {dropped} turn(s) to fit the {session.engine.context}-token context "
                           f"window)", stderr), file=stderr, flush=True)
            result = session.answer(ids, line, stdout)
            print(_dim(f"[{result.summary()}]", stderr), file=stderr, flush=True)
    except KeyboardInterrupt:
        stdout.write("\n")
    return 0


def run(cfg: ChatConfig, stdin: TextIO | None = None, stdout: TextIO | None = None,
        stderr: TextIO | None = None) -> int:
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    dlm, tokenizer, _ = open_for_decoding(cfg.model)
    params = for_model(cfg.decode, dlm, cfg.policy_given)
    session = ChatSession(Engine(dlm, tokenizer), params, cfg.system)
    print(_dim(f"chat with {cfg.model} (block size {dlm.config.block_size}, policy {params.label}); {HELP}",
               stderr), file=stderr, flush=True)
    return chat_loop(session, stdin, stdout, stderr)
