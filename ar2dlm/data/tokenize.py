"""Tokenised examples: records rendered with the chat template, with a flag per token saying whether it may be noised.

Chat and instruction records become one `Example` each: with the tokenizer's chat template the rendered prompt
(everything up to and including the assistant-turn header) is not maskable while the assistant's content and its
end-of-turn token are; without a template (or `chat=False`) the text is `prompt + "\\n" + response + eos` with only
the response and eos maskable. Examples longer than `seq_len` are truncated; those whose response is truncated away
entirely are dropped and counted. Plain-text documents are tokenised (BOS first where the tokenizer adds one, EOS
after each) and packed into chunks of exactly `seq_len` tokens, all maskable; the final partial chunk is kept only
if it has at least `seq_len / 2` tokens. Packed chunks follow the chat/instruction examples in the returned list.

`DataConfig.source` is anything `sources.iter_raw_records` reads, or the word `self`: the corpus the base model wrote
itself (see `training/selfgen.py`), whose path the caller passes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ar2dlm.data.records import Record, first_line, parse_record
from ar2dlm.data.sources import iter_raw_records
from ar2dlm.errors import Ar2dlmError

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    source: str
    seq_len: int = 256
    text_field: str | None = None
    max_records: int | None = None
    chat: bool | None = None  # None: use the chat template for chat/instruction records when the tokenizer has one


@dataclass
class Example:
    input_ids: list[int]
    maskable: list[bool]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class LoadStats:
    records: int = 0
    chat_records: int = 0
    instruction_records: int = 0
    text_records: int = 0
    examples: int = 0
    packed_chunks: int = 0
    truncated: int = 0  # kept, but cut to seq_len
    dropped_truncated: int = 0  # response entirely beyond seq_len
    dropped_empty: int = 0  # nothing to learn: empty answer and no end-of-turn token found
    dropped_tail_tokens: int = 0  # plain-text tokens in a final chunk shorter than seq_len / 2
    used_chat_template: bool = False


# ----------------------------------------------------------------------------------------------- chat template
def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The chat-template rendering of `messages`, by default ending with the assistant-turn header (a prompt)."""
    if tokenizer is None or not has_chat_template(tokenizer):
        raise Ar2dlmError("chat prompts need a tokenizer with a chat template (use chat=False for plain prompts)")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def special_strings(tokenizer) -> list[str]:
    """The special-token strings that may end a turn, longest first (a BOS never ends one)."""
    out = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            out.add(tok.content)
    bos, eos = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "eos_token", None)
    if bos and bos != eos:
        out.discard(bos)
    return sorted((s for s in out if s), key=len, reverse=True)


def _answer_start(tokenizer, messages: list[dict], i: int, full: str, cursor: int) -> int:
    """Where assistant turn i starts in `full`: the end of the rendered prompt before it, or -1 if that prompt is
    not a prefix of the conversation (templates whose generation prompt differs from the stored turn header)."""
    if i == 0:
        return -1
    try:
        prefix = render_chat(tokenizer, messages[:i], True)
    except Exception:  # noqa: BLE001 - fall back to locating the content
        return -1
    return len(prefix) if len(prefix) >= cursor and full.startswith(prefix) else -1


def _turn_end(full: str, at: int, specials: list[str]) -> int:
    """The end of the first special token at or after `at` (the end-of-turn token), else `at`."""
    hits = [(full.find(s, at), s) for s in specials]
    hits = [(p, s) for p, s in hits if p >= 0]
    if not hits:
        return at
    p, s = min(hits, key=lambda h: (h[0], -len(h[1])))
    return p + len(s)


def _chat_spans(tokenizer, messages: list[dict], where: str, specials: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Render with the chat template; return the text and the character spans of each assistant answer + EOT."""
    try:
        full = render_chat(tokenizer, messages, False)
    except Exception as e:  # noqa: BLE001 - jinja errors, template-specific role checks
        raise Ar2dlmError(f"{where}: the tokenizer's chat template rejected this conversation ({first_line(e)})") \
            from None
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        content = m["content"].strip()
        if m["role"] != "assistant":
            # move past this turn's text, so that an answer quoted in the question is not mistaken for the answer
            at = full.find(content, cursor) if content else -1
            if at >= 0:
                cursor = at + len(content)
            continue
        start = _answer_start(tokenizer, messages, i, full, cursor)
        cstart = full.find(content, cursor if start < 0 else start)
        if cstart < 0:
            raise Ar2dlmError(f"{where}: the chat template does not reproduce assistant turn {i} verbatim")
        if start < 0 or start > cstart:
            start = cstart
        end = _turn_end(full, cstart + len(content), specials)
        spans.append((start, end))
        cursor = end
    return full, spans


def _plain_spans(tokenizer, messages: list[dict], bos: str) -> tuple[str, list[tuple[int, int]]]:
    """No chat template: `prompt\\nresponse<eos>` per assistant turn, prompt = the preceding turns' text."""
    eos = tokenizer.eos_token
    text, spans = bos, []
    for m in messages:
        if m["role"] == "assistant":
            start = len(text)
            text += m["content"] + eos
            spans.append((start, len(text)))
        else:
            text += m["content"] + "\n"
    return text, spans


# ----------------------------------------------------------------------------------------------- tokenising
def _bos_string(tokenizer) -> str:
    """The BOS token text if the tokenizer prepends one when asked for special tokens, else ''."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None or bos_id == getattr(tokenizer, "eos_token_id", None):
        return ""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token if ids and ids[0] == bos_id else ""


def _encode_with_spans(tokenizer, texts: list[str], spans: list[list[tuple[int, int]]]) -> list[Example]:
    """Tokenise whole texts; a token is maskable iff its characters overlap a span."""
    if not texts:
        return []
    try:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):
        return [_encode_pieces(tokenizer, text, sp) for text, sp in zip(texts, spans)]
    out = []
    for ids, offs, sp in zip(enc["input_ids"], offsets, spans):
        o = np.asarray(offs, dtype=np.int64).reshape(-1, 2)
        mask = np.zeros(len(o), dtype=bool)
        for s, e in sp:
            mask |= (o[:, 0] < e) & (o[:, 1] > s)
        out.append(Example(list(ids), mask.tolist()))
    return out


def _encode_pieces(tokenizer, text: str, spans: list[tuple[int, int]]) -> Example:
    """A slow tokenizer has no offsets: encode the text between spans and the spans separately."""
    ids, mask, pos = [], [], 0
    for s, e in [*spans, (len(text), len(text))]:
        for piece, maskable in ((text[pos:s], False), (text[s:e], True)):
            if piece:
                p = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += p
                mask += [maskable] * len(p)
        pos = e
    return Example(ids, mask)


def _chat_examples(chats: list[Record], tokenizer, use_template: bool, seq_len: int, stats: LoadStats
                   ) -> list[Example]:
    """One example per conversation, cut to seq_len; dropped (and counted) when no maskable token is left."""
    bos, specials = _bos_string(tokenizer), special_strings(tokenizer)
    rendered = [_chat_spans(tokenizer, r.messages, r.where, specials) if use_template
                else _plain_spans(tokenizer, r.messages, bos) for r in chats]
    examples = []
    for ex in _encode_with_spans(tokenizer, [t for t, _ in rendered], [s for _, s in rendered]):
        if len(ex) > seq_len:
            ex = Example(ex.input_ids[:seq_len], ex.maskable[:seq_len])
            if not any(ex.maskable):
                stats.dropped_truncated += 1
                continue
            stats.truncated += 1
        if any(ex.maskable):
            examples.append(ex)
        else:
            stats.dropped_empty += 1
    return examples


def _packed_examples(texts: list[Record], tokenizer, seq_len: int, stats: LoadStats) -> list[Example]:
    """Documents (BOS where the tokenizer adds one, EOS after each) packed into seq_len chunks, all maskable."""
    eos_id = tokenizer.eos_token_id
    bos_ids = [tokenizer.bos_token_id] if _bos_string(tokenizer) else []
    docs = tokenizer([r.text for r in texts], add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for d in docs:
        stream += bos_ids + list(d) + [eos_id]
    n_full = len(stream) // seq_len
    examples = [Example(stream[k * seq_len:(k + 1) * seq_len], [True] * seq_len) for k in range(n_full)]
    tail = stream[n_full * seq_len:]
    if tail and len(tail) * 2 >= seq_len:
        examples.append(Example(tail, [True] * len(tail)))
    else:
        stats.dropped_tail_tokens += len(tail)
    return examples


def tokenize_records(records: list[Record], tokenizer, config: DataConfig, stats: LoadStats | None = None
                     ) -> list[Example]:
    """Chat/instruction records -> one masked Example each; text records -> packed fully-maskable chunks."""
    stats = stats if stats is not None else LoadStats()
    if config.seq_len < 2:
        raise Ar2dlmError(f"seq_len must be at least 2, got {config.seq_len}")
    if tokenizer.eos_token is None:
        raise Ar2dlmError("the tokenizer has no EOS token; cannot mark document or answer ends")
    chats = [r for r in records if r.kind == "chat"]
    texts = [r for r in records if r.kind == "text"]
    use_template = False
    if chats:
        if config.chat is True and not has_chat_template(tokenizer):
            raise Ar2dlmError("chat formatting was requested but the tokenizer has no chat template")
        use_template = config.chat is not False and has_chat_template(tokenizer)
    stats.used_chat_template = use_template
    examples = _chat_examples(chats, tokenizer, use_template, config.seq_len, stats)
    n_chat = len(examples)
    if texts:
        examples += _packed_examples(texts, tokenizer, config.seq_len, stats)
    stats.packed_chunks = len(examples) - n_chat
    stats.examples = len(examples)
    return examples


# ----------------------------------------------------------------------------------------------- loading
def read_records(config: DataConfig, self_corpus_path: str | Path | None = None) -> tuple[list[Record], LoadStats]:
    """The first `max_records` records of the source, recognised, and their counts by format."""
    source = config.source.strip()
    if source == "self":
        if self_corpus_path is None:
            raise Ar2dlmError("data source 'self' needs the generated corpus; generate it first (selfgen)")
        if not Path(self_corpus_path).is_file():
            raise Ar2dlmError(f"{self_corpus_path}: self-generated corpus not found")
    raw = iter_raw_records(Path(self_corpus_path) if source == "self" else source)
    records = []
    try:
        for where, rec in raw:
            if config.max_records is not None and len(records) >= config.max_records:
                break
            records.append(parse_record(where, rec, config.text_field))
    finally:
        raw.close()
    if not records:
        raise Ar2dlmError(f"{self_corpus_path if source == 'self' else config.source}: no records")
    stats = LoadStats(records=len(records), text_records=sum(r.kind == "text" for r in records),
                      chat_records=sum(r.origin == "chat" for r in records),
                      instruction_records=sum(r.origin == "instruction" for r in records))
    return records, stats


def load_examples_with_stats(config: DataConfig, tokenizer, self_corpus_path: str | Path | None = None
                             ) -> tuple[list[Example], LoadStats]:
    """Read, validate and tokenise the configured source (see the module docstring), with what happened to it."""
    records, stats = read_records(config, self_corpus_path)
    examples = tokenize_records(records, tokenizer, config, stats)
    if not examples:
        raise Ar2dlmError(f"{config.source}: no training examples left at seq_len={config.seq_len} "
                          f"({stats.dropped_truncated} dropped because the prompt fills the whole sequence)")
    if stats.dropped_truncated:
        log.warning("%s: dropped %d examples whose response lies beyond seq_len=%d", config.source,
                    stats.dropped_truncated, config.seq_len)
    log.info("%s: %d records -> %d examples (%d truncated, %d dropped)", config.source, stats.records,
             stats.examples, stats.truncated, stats.dropped_truncated)
    return examples, stats


def load_examples(config: DataConfig, tokenizer, self_corpus_path: str | Path | None = None) -> list[Example]:
    """Read, validate and tokenise the configured source (see the module docstring)."""
    return load_examples_with_stats(config, tokenizer, self_corpus_path)[0]


def split_heldout(examples: list, n_heldout: int, seed: int) -> tuple[list, list]:
    """Deterministically hold out `n_heldout` examples; both parts keep the original order."""
    if n_heldout < 0:
        raise Ar2dlmError(f"the number of held-out examples must be >= 0, got {n_heldout}")
    if n_heldout and n_heldout >= len(examples):
        raise Ar2dlmError(f"cannot hold out {n_heldout} of {len(examples)} examples: nothing would be left to train on")
    g = torch.Generator().manual_seed(seed)
    held = set(torch.randperm(len(examples), generator=g)[:n_heldout].tolist())
    train = [e for i, e in enumerate(examples) if i not in held]
    heldout = [e for i, e in enumerate(examples) if i in held]
    return train, heldout
