"""What the engine hands back: detokenised text, stop tokens and strings, streaming deltas, the final result.

Stops are looked for only in the part of the decoded prefix (the tokens left of the first masked position, which
can no longer change) that just became final. Streaming sends text deltas of that prefix, holding back a tail that
may still change: an incomplete UTF-8 character, trailing spaces (detokenisers may clean them up once the next token
arrives) or the beginning of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ar2dlm.errors import Ar2dlmError


@dataclass
class GenerationResult:
    tokens: list[int]  # generated tokens, up to and including the stop token / the token completing a stop string
    text: str  # decoded without special tokens, cut before a stop string
    nfe: int  # forward passes this sequence took part in
    elapsed_s: float  # from the request's first forward to its end (queueing excluded, see queued_s)
    ttft_s: float | None  # from the first forward to the first final token
    stop_reason: str  # "eos" | "stop_string" | "length" | "cancelled"
    prompt_len: int = 0
    queued_s: float = 0.0  # waiting for a free cache row before the first forward

    @property
    def tpf(self) -> float:
        return len(self.tokens) / max(self.nfe, 1)

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.elapsed_s if self.elapsed_s > 0 else float("inf")

    def summary(self) -> str:
        ttft = f"{self.ttft_s * 1000:.1f} ms" if self.ttft_s is not None else "n/a"
        return (f"{len(self.tokens)} tokens | NFE {self.nfe} | TPF {self.tpf:.2f} | {self.tokens_per_s:.1f} tokens/s"
                f" | TTFT {ttft} | stop: {self.stop_reason}")


def check_text(text: str) -> str:
    """Bytes that are not UTF-8 reach us as lone surrogates (argv, a piped stdin); the tokenizer would fail on them
    with a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise Ar2dlmError("the text is not valid UTF-8") from None
    return text


def encode_prompt(tokenizer, text: str, chat: bool = False) -> list[int]:
    """Token ids of a prompt; `chat` wraps it as one user turn with the tokenizer's chat template."""
    check_text(text)
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise Ar2dlmError("this tokenizer has no chat template (drop --chat)")
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"])
    return list(tokenizer(text)["input_ids"])


def default_stop_ids(tokenizer=None, hf_config=None) -> tuple[int, ...]:
    """The tokenizer's EOS and end-of-turn (`<|im_end|>`) ids; without a tokenizer, the model config's EOS."""
    if tokenizer is not None:
        ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
        ids.discard(tokenizer.unk_token_id)
    else:
        eos = getattr(hf_config, "eos_token_id", None)
        ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return tuple(sorted(i for i in ids if isinstance(i, int)))


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text before the first stop string, and whether there was one."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def hold_back(text: str, stops: Sequence[str]) -> str:
    """The part of a growing text that is safe to stream (see the module docstring)."""
    keep = len(text)
    for s in stops:
        for n in range(min(len(s) - 1, keep), 0, -1):
            if text[:keep].endswith(s[:n]):
                keep -= n
                break
    return text[:keep].rstrip("\ufffd").rstrip()


class Detokenizer:
    """Token ids to text for one request; without a tokenizer every text is empty (token-id-only use)."""

    def __init__(self, tokenizer, stop_strings: Sequence[str]):
        if stop_strings and tokenizer is None:
            raise Ar2dlmError("stop strings need a tokenizer")
        self.tokenizer, self.stop_strings = tokenizer, tuple(stop_strings)
        self.emitted = ""  # text already streamed

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else ""

    def final_text(self, tokens: Sequence[int]) -> str:
        return cut_at_stop(self.decode(tokens), self.stop_strings)[0]

    def first_stop_string_end(self, tokens: Sequence[int], old: int, new: int) -> int | None:
        """The smallest n in (old, new] such that tokens[:n] holds a stop string, or None."""
        if not self.stop_strings or self.tokenizer is None or new <= old:
            return None
        if not cut_at_stop(self.decode(tokens[:new]), self.stop_strings)[1]:
            return None
        return next(n for n in range(old + 1, new + 1) if cut_at_stop(self.decode(tokens[:n]), self.stop_strings)[1])

    def delta(self, tokens: Sequence[int], final: bool) -> str:
        """New text to stream for the decoded `tokens`; `final` flushes the held-back tail."""
        text = self.final_text(tokens)
        if not final:
            text = hold_back(text, self.stop_strings)
        if len(text) > len(self.emitted) and text.startswith(self.emitted):
            new, self.emitted = text[len(self.emitted):], text
            return new
        return ""
