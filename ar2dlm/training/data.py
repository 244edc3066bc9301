"""Conversion-training data: read records, tokenise them with a response mask, and batch them reproducibly.

Sources (`DataConfig.source`):
  * a local file: `.jsonl`, `.jsonl.gz`, `.json` (a list of records, `{"<key>": [records]}`, or JSON lines),
    `.parquet`, or `.txt` (plain text; documents are separated by one or more blank lines);
  * a Hugging Face dataset id `name[:config][@split]`, e.g. `openai/gsm8k:main@train` (split defaults to `train`);
  * the word `self`: the corpus the base model wrote itself (see `selfgen.py`); the caller passes its path.

Record formats, detected per record (first match wins):
  * chat:        `{"messages": [{"role": ..., "content": ...}, ...]}` (also ShareGPT `conversations` with
                 `from`/`value`); every assistant turn is a response.
  * instruction: a prompt field (`prompt`, `instruction`, `question`, `input`) and a response field
                 (`response`, `output`, `answer`, `completion`); `instruction` + non-empty `input` are joined
                 with a blank line; an optional `system` string becomes a system turn.
  * plain text:  `{"text": ...}` (or the field named by `DataConfig.text_field`, which forces plain text).

Chat and instruction records become one `Example` each: with the tokenizer's chat template the rendered prompt
(everything up to and including the assistant-turn header) is not maskable while the assistant's content and its
end-of-turn token are; without a template (or `chat=False`) the text is `prompt + "\\n" + response + eos` with only
the response and eos maskable. Examples longer than `seq_len` are truncated; those whose response is truncated away
entirely are dropped and counted. Plain-text documents are tokenised (BOS first where the tokenizer adds one, EOS
after each) and packed into chunks of exactly `seq_len` tokens, all maskable; the final partial chunk is kept only
if it has at least `seq_len / 2` tokens. Packed chunks follow the chat/instruction examples in the returned list.

A malformed record is an `Ar2dlmError` naming the file and line (`path:line: ...`; `path: item i` for JSON arrays,
`path: row i` for parquet and hub datasets), never skipped silently.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ar2dlm.errors import Ar2dlmError
from ar2dlm.utils.records import first_line, iter_jsonl, iter_jsonl_file, read_text_lines

log = logging.getLogger(__name__)

PROMPT_KEYS = ("prompt", "instruction", "question", "input")
RESPONSE_KEYS = ("response", "output", "answer", "completion")
CHAT_KEYS = ("messages", "conversations")
LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".txt")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "model": "assistant"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?(@[\w.\[\]:%+-]+)?$")


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


@dataclass
class _Record:
    kind: str  # "chat" or "text"
    where: str
    messages: list[dict] = field(default_factory=list)
    text: str = ""
    origin: str = ""  # "chat", "instruction" or "text": the format the record came in


# ----------------------------------------------------------------------------------------------------------------
# Reading records


def _iter_local(path: Path) -> Iterator[tuple[str, object]]:
    name = path.name.lower()
    if name.endswith(".jsonl.gz"):
        yield from iter_jsonl_file(path)
    elif name.endswith(".jsonl"):
        yield from iter_jsonl_file(path)
    elif name.endswith(".json"):
        lines = read_text_lines(path)
        try:
            obj = json.loads("\n".join(lines))
        except json.JSONDecodeError:
            yield from iter_jsonl(path, lines)  # JSON lines under a .json name; errors name the line
            return
        if isinstance(obj, dict):
            lists = [v for v in obj.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise Ar2dlmError(f"{path}: expected a JSON list of records (or an object holding exactly one list)")
            obj = lists[0]
        if not isinstance(obj, list):
            raise Ar2dlmError(f"{path}: expected a JSON list of records, got {type(obj).__name__}")
        for i, rec in enumerate(obj):
            yield f"{path}: item {i}", rec
    elif name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a bad file
            raise Ar2dlmError(f"{path}: cannot read parquet ({first_line(e)})") from None
        for batch in table.to_batches():
            for rec in batch.to_pylist():
                yield "", rec
    elif name.endswith(".txt"):
        para: list[str] = []
        start = 0
        for i, line in enumerate([*read_text_lines(path), ""], 1):
            if line.strip():
                if not para:
                    start = i
                para.append(line)
            elif para:
                yield f"{path}:{start}", {"text": "\n".join(para)}
                para = []
    else:
        raise Ar2dlmError(f"{path}: unsupported file type (use one of {', '.join(LOCAL_SUFFIXES)})")


def parse_hub_id(source: str) -> tuple[str, str | None, str]:
    """`name[:config][@split]` -> (name, config or None, split; default "train")."""
    name, _, split = source.partition("@")
    name, _, config = name.partition(":")
    return name, (config or None), (split or "train")


def _iter_hub(source: str) -> Iterator[tuple[str, object]]:
    name, config, split = parse_hub_id(source)
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except ImportError as e:
        raise Ar2dlmError(f"loading hub dataset {source!r} needs the `datasets` package ({first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - network, auth, unknown id, bad config/split: all one user-facing line
        raise Ar2dlmError(
            f"could not load dataset {source!r} (name {name!r}, config {config!r}, split {split!r}) from the "
            f"Hugging Face hub: {type(e).__name__}: {first_line(e)}"
        ) from None
    for rec in ds:
        yield "", rec


def _is_local(source: str) -> bool:
    low = source.lower()
    return (Path(source).expanduser().exists() or low.endswith(LOCAL_SUFFIXES) or low.endswith(".gz")
            or source.startswith(("/", "./", "../", "~", "\\")))


def iter_records(config: DataConfig, self_corpus_path: str | Path | None = None) -> Iterator[tuple[str, object]]:
    """Yield (location, raw record) pairs from the configured source (location names file and line)."""
    source = config.source.strip()
    if source == "self":
        if self_corpus_path is None:
            raise Ar2dlmError("data source 'self' needs the generated corpus; generate it first (selfgen)")
        path = Path(self_corpus_path)
        if not path.is_file():
            raise Ar2dlmError(f"{path}: self-generated corpus not found")
        return _iter_local(path)
    if not source:
        raise Ar2dlmError("no data source given")
    if _is_local(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise Ar2dlmError(f"{path}: data file not found")
        if path.is_dir():
            raise Ar2dlmError(f"{path}: is a folder; give a data file ({', '.join(LOCAL_SUFFIXES)})")
        return _iter_local(path)
    if _HUB_ID.match(source):
        return _iter_hub(source)
    raise Ar2dlmError(f"data source {source!r} is neither a file ({', '.join(LOCAL_SUFFIXES)}), "
                      "a hub dataset id (name[:config][@split]) nor 'self'")


def _messages(where: str, raw, key: str) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise Ar2dlmError(f"{where}: '{key}' must be a non-empty list of turns")
    out = []
    for j, turn in enumerate(raw):
        if not isinstance(turn, dict):
            raise Ar2dlmError(f"{where}: {key}[{j}] must be an object, got {type(turn).__name__}")
        if "role" in turn or "content" in turn:
            role, content = turn.get("role"), turn.get("content")
        else:
            role, content = turn.get("from"), turn.get("value")
            role = _SHAREGPT_ROLES.get(role, role) if isinstance(role, str) else role
        if not isinstance(role, str) or not role:
            raise Ar2dlmError(f"{where}: {key}[{j}] needs a string 'role'")
        if not isinstance(content, str):
            raise Ar2dlmError(f"{where}: {key}[{j}] needs a string 'content', got {type(content).__name__}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise Ar2dlmError(f"{where}: '{key}' has no assistant turn to learn from")
    return out


def parse_record(where: str, rec, text_field: str | None = None) -> _Record:
    """Detect the format of one raw record; raise Ar2dlmError naming `where` if it fits none."""
    if not isinstance(rec, dict):
        raise Ar2dlmError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    if text_field is not None:
        if text_field not in rec:
            raise Ar2dlmError(f"{where}: no field {text_field!r} (fields: {', '.join(map(str, rec)) or 'none'})")
        if not isinstance(rec[text_field], str):
            raise Ar2dlmError(f"{where}: field {text_field!r} must be a string, got {type(rec[text_field]).__name__}")
        return _Record("text", where, text=rec[text_field], origin="text")
    for key in CHAT_KEYS:
        if key in rec:
            return _Record("chat", where, messages=_messages(where, rec[key], key), origin="chat")
    pkey = next((k for k in PROMPT_KEYS if k in rec), None)
    rkey = next((k for k in RESPONSE_KEYS if k in rec), None)
    if pkey is not None and rkey is not None:
        for k in (pkey, rkey):
            if not isinstance(rec[k], str):
                raise Ar2dlmError(f"{where}: field {k!r} must be a string, got {type(rec[k]).__name__}")
        prompt = rec[pkey]
        if pkey == "instruction" and isinstance(rec.get("input"), str) and rec["input"].strip():
            prompt = f"{prompt}\n\n{rec['input']}"
        messages = []
        if rec.get("system") is not None:
            if not isinstance(rec["system"], str):
                raise Ar2dlmError(f"{where}: field 'system' must be a string, got {type(rec['system']).__name__}")
            messages.append({"role": "system", "content": rec["system"]})
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": rec[rkey]}]
        return _Record("chat", where, messages=messages, origin="instruction")
    if "text" in rec:
        if not isinstance(rec["text"], str):
            raise Ar2dlmError(f"{where}: field 'text' must be a string, got {type(rec['text']).__name__}")
        return _Record("text", where, text=rec["text"], origin="text")
    if pkey is not None or rkey is not None:
        have, want = (pkey, RESPONSE_KEYS) if pkey else (rkey, PROMPT_KEYS)
        raise Ar2dlmError(f"{where}: has {have!r} but none of {', '.join(want)}")
    raise Ar2dlmError(
        f"{where}: unknown record format (fields: {', '.join(map(str, rec)) or 'none'}); expected 'messages', "
        f"a prompt field ({'/'.join(PROMPT_KEYS)}) with a response field ({'/'.join(RESPONSE_KEYS)}), or 'text'"
    )


# ----------------------------------------------------------------------------------------------------------------
# Tokenisation


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _special_strings(tokenizer) -> list[str]:
    out = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            out.add(tok.content)
    bos, eos = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "eos_token", None)
    if bos and bos != eos:
        out.discard(bos)  # a begin-of-turn token never ends a turn
    return sorted((s for s in out if s), key=len, reverse=True)


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _chat_spans(tokenizer, messages: list[dict], where: str, specials: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Render with the chat template; return the text and the character spans of each assistant answer + EOT."""
    try:
        full = _render(tokenizer, messages, False)
    except Exception as e:  # noqa: BLE001 - jinja errors, template-specific role checks
        raise Ar2dlmError(f"{where}: the tokenizer's chat template rejected this conversation ({first_line(e)})") \
            from None
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            # move past this turn's text, so that an answer quoted in the question is not mistaken for the answer
            at = full.find(m["content"].strip(), cursor) if m["content"].strip() else -1
            if at >= 0:
                cursor = at + len(m["content"].strip())
            continue
        start = -1
        if i > 0:
            try:
                prefix = _render(tokenizer, messages[:i], True)
            except Exception:  # noqa: BLE001 - fall back to locating the content
                prefix = None
            if prefix is not None and len(prefix) >= cursor and full.startswith(prefix):
                start = len(prefix)
        content = m["content"].strip()
        cstart = full.find(content, cursor if start < 0 else start)
        if cstart < 0:
            raise Ar2dlmError(f"{where}: the chat template does not reproduce assistant turn {i} verbatim")
        if start < 0 or start > cstart:
            start = cstart
        cend = cstart + len(content)
        end = cend
        hits = [(full.find(s, cend), s) for s in specials]
        hits = [(p, s) for p, s in hits if p >= 0]
        if hits:
            p, s = min(hits, key=lambda h: (h[0], -len(h[1])))
            end = p + len(s)
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


def _bos_string(tokenizer) -> str:
    """The BOS token text if the tokenizer prepends one when asked for special tokens, else ''."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None or bos_id == getattr(tokenizer, "eos_token_id", None):
        return ""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token if ids and ids[0] == bos_id else ""


def _encode_with_spans(tokenizer, texts: list[str], spans: list[list[tuple[int, int]]]) -> list[Example]:
    """Tokenise whole texts; a token is maskable iff its characters overlap a span."""
    out = []
    if not texts:
        return out
    try:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):
        offsets = None
    if offsets is not None:
        for ids, offs, sp in zip(enc["input_ids"], offsets, spans):
            o = np.asarray(offs, dtype=np.int64).reshape(-1, 2)
            mask = np.zeros(len(o), dtype=bool)
            for s, e in sp:
                mask |= (o[:, 0] < e) & (o[:, 1] > s)
            out.append(Example(list(ids), mask.tolist()))
        return out
    # slow tokenizer without offsets: encode the pieces separately
    for text, sp in zip(texts, spans):
        ids, mask, pos = [], [], 0
        for s, e in [*sp, (len(text), len(text))]:
            for piece, m in ((text[pos:s], False), (text[s:e], True)):
                if piece:
                    p = tokenizer(piece, add_special_tokens=False)["input_ids"]
                    ids += p
                    mask += [m] * len(p)
            pos = e
        out.append(Example(ids, mask))
    return out


def tokenize_records(records: list[_Record], tokenizer, config: DataConfig, stats: LoadStats | None = None
                     ) -> list[Example]:
    """Chat/instruction records -> one masked Example each; text records -> packed fully-maskable chunks."""
    stats = stats if stats is not None else LoadStats()
    seq_len = config.seq_len
    if seq_len < 2:
        raise Ar2dlmError(f"seq_len must be at least 2, got {seq_len}")
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
    bos = _bos_string(tokenizer)
    specials = _special_strings(tokenizer)

    rendered, spans = [], []
    for r in chats:
        t, s = _chat_spans(tokenizer, r.messages, r.where, specials) if use_template \
            else _plain_spans(tokenizer, r.messages, bos)
        rendered.append(t)
        spans.append(s)
    examples = []
    for ex in _encode_with_spans(tokenizer, rendered, spans):
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

    n_chat = len(examples)
    if texts:
        eos_id = tokenizer.eos_token_id
        bos_ids = [tokenizer.bos_token_id] if bos else []
        docs = tokenizer([r.text for r in texts], add_special_tokens=False)["input_ids"]
        stream: list[int] = []
        for d in docs:
            stream += bos_ids + list(d) + [eos_id]
        n_full = len(stream) // seq_len
        for k in range(n_full):
            examples.append(Example(stream[k * seq_len:(k + 1) * seq_len], [True] * seq_len))
        tail = stream[n_full * seq_len:]
        if tail and len(tail) * 2 >= seq_len:
            examples.append(Example(tail, [True] * len(tail)))
        else:
            stats.dropped_tail_tokens += len(tail)
    stats.packed_chunks = len(examples) - n_chat
    stats.examples = len(examples)
    return examples


def load_examples_with_stats(config: DataConfig, tokenizer, self_corpus_path: str | Path | None = None
                             ) -> tuple[list[Example], LoadStats]:
    stats = LoadStats()
    records = []
    for where, rec in iter_records(config, self_corpus_path):
        if config.max_records is not None and len(records) >= config.max_records:
            break
        where = where or f"{config.source}: row {len(records)}"
        records.append(parse_record(where, rec, config.text_field))
    if not records:
        raise Ar2dlmError(f"{self_corpus_path if config.source == 'self' else config.source}: no records")
    stats.records = len(records)
    stats.text_records = sum(r.kind == "text" for r in records)
    stats.chat_records = sum(r.kind == "chat" and r.origin == "chat" for r in records)
    stats.instruction_records = sum(r.kind == "chat" and r.origin == "instruction" for r in records)
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


# ----------------------------------------------------------------------------------------------------------------
# Batching


@dataclass
class Batch:
    input_ids: torch.Tensor  # LongTensor [N, L], right-padded with pad_id
    maskable: torch.Tensor  # BoolTensor [N, L], False on padding
    lengths: torch.Tensor  # LongTensor [N]


def collate(examples: list[Example], pad_id: int, pad_to_multiple: int = 8) -> Batch:
    """Right-pad to the longest row, rounded up to a multiple of `pad_to_multiple`."""
    longest = max(len(e) for e in examples)
    m = max(1, pad_to_multiple)
    width = -(-longest // m) * m
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, :len(e)] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[i, :len(e)] = torch.tensor(e.maskable, dtype=torch.bool)
    return Batch(ids, mask, torch.tensor([len(e) for e in examples], dtype=torch.long))


def iter_batches(examples: list[Example], batch_size: int, pad_id: int, pad_to_multiple: int = 8) -> Iterator[Batch]:
    """One pass in order, the last batch possibly smaller (for evaluation)."""
    for i in range(0, len(examples), batch_size):
        yield collate(examples[i:i + batch_size], pad_id, pad_to_multiple)


class Batcher:
    """Endless, seeded, exactly resumable batches.

    Each epoch is a permutation of all examples (`torch.randperm` seeded with `seed + epoch`, or the identity when
    `shuffle=False`). Global batches of `batch_size * world_size` consecutive examples are cut from the epoch
    order, running on into the next epoch when one ends, so every batch is full and every example is seen once per
    epoch. Rank r takes rows r::world_size of each global batch. `state_dict()` is the position of the next global
    batch; `load_state_dict()` on a fresh Batcher (same examples, sizes and seed) continues exactly there.
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, pad_to_multiple: int = 8):
        if not examples:
            raise Ar2dlmError("no training examples to batch")
        if batch_size < 1:
            raise Ar2dlmError(f"batch size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise Ar2dlmError(f"invalid rank {rank} for world size {world_size}")
        self.examples = examples
        self.batch_size, self.seed, self.pad_id, self.shuffle = batch_size, seed, pad_id, shuffle
        self.rank, self.world_size, self.pad_to_multiple = rank, world_size, pad_to_multiple
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = -1, None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def _order_for(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:
            n = len(self.examples)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._order = torch.randperm(n, generator=g).tolist()
            else:
                self._order = list(range(n))
            self._order_epoch = epoch
        return self._order

    def next_indices(self) -> list[int]:
        """Advance by one global batch; return this rank's example indices."""
        picked = []
        n = len(self.examples)
        while len(picked) < self.global_batch_size:
            order = self._order_for(self.epoch)
            take = min(self.global_batch_size - len(picked), n - self.index)
            picked += order[self.index:self.index + take]
            self.index += take
            if self.index >= n:
                self.epoch, self.index = self.epoch + 1, 0
        return picked[self.rank::self.world_size]

    def __iter__(self) -> Batcher:
        return self

    def __next__(self) -> Batch:
        return collate([self.examples[i] for i in self.next_indices()], self.pad_id, self.pad_to_multiple)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < len(self.examples):
            raise Ar2dlmError(f"batcher state {state} does not fit {len(self.examples)} examples; "
                              "was the data changed since the checkpoint?")
        self.epoch, self.index = epoch, index
