"""The data-free corpus `self`: the base AR model writes its own conversion-training data.

Chat models (the tokenizer has a chat template) write both sides of a one-turn conversation: the model is started
on the template's user-turn prefix (e.g. `<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n`) and writes a
user message up to its end-of-turn token; that message is rendered with `add_generation_prompt=True` and the model
answers it. Records are `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`. Other models are
started on their BOS token (EOS when there is none) and records are `{"text": ...}`.

Empty, short and degenerate (repetitive) outputs are filtered and counted. The corpus is written atomically as
JSON lines to `cache_path`, with `<cache_path>.meta.json` beside it (model, settings, counts). A cache file that
already holds at least `n_samples` records is reused as is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ar2dlm.data.tokenize import DataConfig, has_chat_template, read_records, render_chat, special_strings
from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.loading import cache_dir, resolve_model_source
from ar2dlm.utils.files import appended_records, atomic_write, write_json

log = logging.getLogger(__name__)

SENTINEL = "\u2063AR2DLM-USER-SENTINEL-7f3a\u2063"
ANSWER_SEED_OFFSET = 1_000_003  # answers of round r are sampled with seed + r + this
MIN_DISTINCT_TRIGRAM_FRACTION = 0.3
MIN_DISTINCT_CHAR_8GRAM_FRACTION = 0.2


def degenerate_reason(text: str, min_chars: int = 1) -> str | None:
    """Why `text` is unfit as training data ("empty", "short", "repetitive"), or None if it is fine.

    Repetitive: one word repeated (4+ words), one non-space character repeated (8+), fewer than 30% distinct word
    3-grams (6+ words), or fewer than 20% distinct character 8-grams (40+ characters, whitespace collapsed).
    """
    s = text.strip()
    if not s:
        return "empty"
    if len(s) < min_chars:
        return "short"
    words = s.split()
    if len(words) >= 4 and len(set(words)) == 1:
        return "repetitive"
    chars = "".join(words)
    if len(chars) >= 8 and len(set(chars)) == 1:
        return "repetitive"
    if len(words) >= 6:
        grams = list(zip(words, words[1:], words[2:]))
        if len(set(grams)) / len(grams) < MIN_DISTINCT_TRIGRAM_FRACTION:
            return "repetitive"
    flat = " ".join(words)
    if len(flat) >= 40:
        grams = [flat[i:i + 8] for i in range(len(flat) - 7)]
        if len(set(grams)) / len(grams) < MIN_DISTINCT_CHAR_8GRAM_FRACTION:
            return "repetitive"
    return None


def user_turn_prefix(tokenizer) -> tuple[str, int | None]:
    """The rendered text before a user message's content, and the id of the token that ends a user turn."""
    try:
        rendered = render_chat(tokenizer, [{"role": "user", "content": SENTINEL}], add_generation_prompt=False)
    except Exception as e:  # noqa: BLE001 - template errors
        raise Ar2dlmError(f"the tokenizer's chat template cannot render a user turn ({e})") from None
    at = rendered.find(SENTINEL)
    if at < 0:
        raise Ar2dlmError("the tokenizer's chat template does not reproduce the user message verbatim")
    prefix, after = rendered[:at], rendered[at + len(SENTINEL):]
    hits = [(after.find(s), s) for s in special_strings(tokenizer)]
    hits = [(p, s) for p, s in hits if p >= 0]
    eot = None
    if hits:
        _, s = min(hits, key=lambda h: (h[0], -len(h[1])))
        eot = tokenizer.convert_tokens_to_ids(s)
    return prefix, eot


@contextlib.contextmanager
def _left_padding(tokenizer):
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None


def _sample(model, tokenizer, prompts: list[str], stop_ids: list[int], max_new_tokens: int, temperature: float,
            top_p: float, seed: int) -> list[tuple[str, bool]]:
    """Sample one continuation per prompt; return (decoded text, ended with a stop token)."""
    with _left_padding(tokenizer):
        enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
        pad_id = tokenizer.pad_token_id
    device = next(model.parameters()).device
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(seed)
        # temperature 0 means greedy: the model's own most likely answer
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        out = model.generate(
            input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
            max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id, **sampling,
        )
    new = out[:, enc["input_ids"].shape[1]:].tolist()
    stops = set(stop_ids)
    results = []
    for row in new:
        cut = next((i for i, t in enumerate(row) if t in stops), None)
        toks = row if cut is None else row[:cut]
        results.append((tokenizer.decode(toks, skip_special_tokens=True), cut is not None))
    return results


def count_records(path: str | Path) -> int:
    """Non-empty lines in a JSON-lines file (0 if it is missing)."""
    try:
        with open(path, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


def metadata_path(cache_path: str | Path) -> Path:
    cache_path = Path(cache_path)
    return cache_path.with_name(cache_path.name + ".meta.json")


def self_corpus_path(cfg) -> Path:
    """Cache location of the base model's own corpus, keyed by everything that changes its content: the model and the
    `self_*` settings and seed of a conversion config (convert writes the corpus, distill reads the same one)."""
    key = json.dumps([resolve_model_source(cfg.model), cfg.self_samples, cfg.self_max_new_tokens,
                      cfg.self_answer_temperature, cfg.seed])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / "self-corpus" / f"{Path(cfg.model).name}-{digest}.jsonl"


@dataclass(frozen=True)
class _Start:
    """Where generation starts and what stops it."""
    chat: bool  # chat records (user + assistant) rather than plain text
    prefix: str  # the text every first sample continues
    stop_ids: list[int]


@dataclass(frozen=True)
class _Settings:
    """How the corpus is sampled; the fields in the order the metadata records them."""
    max_new_tokens: int
    seed: int
    batch_size: int
    temperature: float
    answer_temperature: float
    user_max_new_tokens: int
    top_p: float
    min_chars: int
    keep_unfinished: bool


@dataclass
class _Tally:
    """What happened to the samples, for the warning, the error and the metadata."""
    started: float = field(default_factory=time.time)
    attempted: int = 0
    unfinished: int = 0  # kept, but hit max_new_tokens before an end-of-turn token
    filtered: Counter = field(default_factory=Counter)


def generate_self_corpus(model, tokenizer, n_samples: int, max_new_tokens: int, cache_path: str | Path, seed: int,
                         batch_size: int = 16, temperature: float = 0.8, top_p: float = 0.95, min_chars: int = 8,
                         max_rounds: int | None = None, keep_unfinished: bool = True,
                         user_max_new_tokens: int | None = None, answer_temperature: float | None = None) -> Path:
    """Write (or reuse) a self-generated corpus of `n_samples` records at `cache_path`; return the path.

    Sampling is seeded (round r samples with `seed + r`) and leaves the caller's RNG state alone. Generation stops
    after `max_rounds` batches (default: enough for 4x `n_samples` attempts); if fewer records survived the filter
    the corpus is written with what there is (a warning), and none at all is an Ar2dlmError. An output that hits
    `max_new_tokens` before its end-of-turn token is "unfinished": kept (and counted) unless `keep_unfinished` is
    False, since training appends an end-of-turn token to it.

    For chat models the user turn has its own, shorter limit (`user_max_new_tokens`, default min(64,
    max_new_tokens)): a question, not an essay. `answer_temperature` (default `temperature`) can be lower, so the
    answers stay close to what the model itself would say greedily, which is what a converted model should reproduce.
    """
    cache_path = Path(cache_path)
    if n_samples < 1:
        raise Ar2dlmError(f"the self-generated corpus needs at least 1 sample, got {n_samples}")
    if max_new_tokens < 1 or batch_size < 1:
        raise Ar2dlmError("max_new_tokens and batch_size must be >= 1")
    have = count_records(cache_path)
    if have >= n_samples:
        log.info("reusing self-generated corpus %s (%d records)", cache_path, have)
        return cache_path

    start = _generation_start(tokenizer)
    settings = _Settings(max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, temperature=temperature,
                         answer_temperature=temperature if answer_temperature is None else answer_temperature,
                         user_max_new_tokens=user_max_new_tokens or min(64, max_new_tokens), top_p=top_p,
                         min_chars=min_chars, keep_unfinished=keep_unfinished)
    if max_rounds is None:
        max_rounds = math.ceil(4 * n_samples / batch_size) + 1
    tally = _Tally()
    records = _sample_records(model, tokenizer, start, settings, n_samples, max_rounds, tally)
    if not records:
        raise Ar2dlmError(f"self-generated corpus: all {tally.attempted} samples were empty or degenerate "
                          f"({dict(tally.filtered)}); try a larger max_new_tokens or a smaller min_chars")
    if len(records) < n_samples:
        log.warning("self-generated corpus: only %d of %d samples passed the filter after %d attempts",
                    len(records), n_samples, tally.attempted)
    _write_corpus(cache_path, records, model, start, settings, n_samples, tally)
    return cache_path


def _generation_start(tokenizer) -> _Start:
    """Chat models start on the template's user-turn prefix and stop at its end-of-turn (or EOS) token; other models
    start on BOS (EOS when there is none) and stop at EOS."""
    chat = has_chat_template(tokenizer)
    eos_id = tokenizer.eos_token_id
    if chat:
        prefix, eot = user_turn_prefix(tokenizer)
        stop_ids = sorted({i for i in (eot, eos_id) if i is not None})
    else:
        start = tokenizer.bos_token if tokenizer.bos_token is not None else tokenizer.eos_token
        if start is None:
            raise Ar2dlmError("the tokenizer has neither a BOS nor an EOS token to start generation from")
        prefix = start
        stop_ids = [eos_id] if eos_id is not None else []
    if not stop_ids:
        raise Ar2dlmError("the tokenizer has no end-of-turn or EOS token to stop generation at")
    return _Start(chat, prefix, stop_ids)


def _sample_records(model, tokenizer, start: _Start, settings: _Settings, n_samples: int, max_rounds: int,
                    tally: _Tally) -> list[dict]:
    """Up to `n_samples` records from at most `max_rounds` rounds, the model in eval mode meanwhile."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    records: list[dict] = []
    bar = tqdm(total=n_samples, desc="self-corpus", unit="sample")
    try:
        for r in range(max_rounds):
            if len(records) >= n_samples:
                break
            new = _sample_round(model, tokenizer, start, settings, settings.seed + r, tally)
            new = new[:n_samples - len(records)]
            tally.unfinished += sum(not done for _, done in new)
            records += [rec for rec, _ in new]
            bar.update(len(new))
    finally:
        bar.close()
        model.train(was_training)
    return records


def _rejection(text: str, done: bool, settings: _Settings) -> str | None:
    """Why a sampled output is dropped (degenerate, or unfinished when those are not kept), or None to keep it."""
    return degenerate_reason(text, settings.min_chars) or (None if done or settings.keep_unfinished else "unfinished")


def _sample_round(model, tokenizer, start: _Start, settings: _Settings, seed: int,
                  tally: _Tally) -> list[tuple[dict, bool]]:
    """One batch of first samples (user turns, or plain text) and, for chat, their answers: the records that passed
    the filter, each with whether all its turns ended with a stop token."""
    limit = settings.user_max_new_tokens if start.chat else settings.max_new_tokens
    first = _sample(model, tokenizer, [start.prefix] * settings.batch_size, start.stop_ids, limit,
                    settings.temperature, settings.top_p, seed)
    tally.attempted += settings.batch_size
    role = "user" if start.chat else "text"
    kept = []
    for text, done in first:
        reason = _rejection(text, done, settings)
        if reason:
            tally.filtered[f"{role}_{reason}"] += 1
        else:
            kept.append((text.strip(), done))
    if not start.chat:
        return [({"text": t}, done) for t, done in kept]
    if not kept:
        return []
    return _answer_round(model, tokenizer, kept, start.stop_ids, settings, seed + ANSWER_SEED_OFFSET, tally)


def _answer_round(model, tokenizer, users: list[tuple[str, bool]], stop_ids: list[int], settings: _Settings,
                  seed: int, tally: _Tally) -> list[tuple[dict, bool]]:
    """The model's answers to the kept user turns, as chat records (answers that fail the filter are counted)."""
    prompts = [render_chat(tokenizer, [{"role": "user", "content": u}]) for u, _ in users]
    answers = _sample(model, tokenizer, prompts, stop_ids, settings.max_new_tokens, settings.answer_temperature,
                      settings.top_p, seed)
    new: list[tuple[dict, bool]] = []
    for (u, u_done), (a, done) in zip(users, answers):
        reason = _rejection(a, done, settings)
        if reason:
            tally.filtered[f"assistant_{reason}"] += 1
            continue
        new.append(({"messages": [{"role": "user", "content": u},
                                  {"role": "assistant", "content": a.strip()}]}, u_done and done))
    return new


def _metadata(model, start: _Start, settings: _Settings, n_samples: int, n_records: int, tally: _Tally) -> dict:
    return {
        "model": getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None),
        "model_type": getattr(model.config, "model_type", None),
        "format": "chat" if start.chat else "text",
        "user_turn_prefix": start.prefix if start.chat else None,
        "n_samples": n_samples,
        "records": n_records,
        "attempted": tally.attempted,
        "filtered": dict(tally.filtered),
        "unfinished": tally.unfinished,
        "settings": asdict(settings),
        "seconds": round(time.time() - tally.started, 2),
    }


def _write_corpus(cache_path: Path, records: list[dict], model, start: _Start, settings: _Settings, n_samples: int,
                  tally: _Tally) -> None:
    """The records as JSON lines (atomically, so a failed run leaves an old cache intact), then the metadata (its
    time includes the writing)."""
    with atomic_write(cache_path) as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    write_json(metadata_path(cache_path), _metadata(model, start, settings, n_samples, len(records), tally))
    log.info("self-generated corpus: %d records at %s (%d filtered)", len(records), cache_path,
             sum(tally.filtered.values()))


# ------------------------------------------------------------------------------------ the parent's own answers
def parent_answers_path(cfg) -> Path:
    """Cache location of the parent's answers to `cfg.data`'s prompts, keyed by the model, the data file (path,
    size and modification time, or the hub id), `max_records` and the answer settings."""
    source = str(cfg.data).strip()
    path = Path(source).expanduser()
    stat = path.stat() if path.is_file() else None
    identity = [str(path.resolve()), stat.st_size, stat.st_mtime_ns] if stat else source
    key = json.dumps([resolve_model_source(cfg.model), identity, cfg.max_records, cfg.self_max_new_tokens,
                      cfg.self_answer_temperature, cfg.seed])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / "parent-answers" / f"{Path(cfg.model).name}-{path.stem or 'data'}-{digest}.jsonl"


def write_parent_answers(model, tokenizer, source: str, cache_path: str | Path, max_records: int | None,
                         max_new_tokens: int, temperature: float, seed: int, batch_size: int = 64) -> Path:
    """Answer the prompt of every chat or instruction record of `source` (its turns before the first assistant
    turn) with `model`, and write the records with those answers instead of the data's at `cache_path` (reused when
    it exists). Training a drafter on them teaches it the wording the parent really produces at decoding time, not
    the dataset's. Answers that hit `max_new_tokens` are kept; degenerate ones are dropped and counted. Prompts are
    answered in batches of similar length (less padding), and the records keep the data's order. Each finished
    batch goes to `<cache_path>.partial` at once, so a run that is killed (hours of answers, for a large corpus)
    resumes where it stopped; each batch's seed is fixed, so a resumed run writes what one run would have."""
    cache_path = Path(cache_path)
    have = count_records(cache_path)
    if have:
        log.info("reusing the parent's answers %s (%d records)", cache_path, have)
        return cache_path
    if not has_chat_template(tokenizer):
        raise Ar2dlmError("answers from the parent need a chat model (its tokenizer has no chat template)")
    records, _ = read_records(DataConfig(source=source, max_records=max_records))
    prompts = [turns for turns in (_prompt_turns(r.messages) for r in records if r.kind == "chat")
               if turns and turns[-1]["role"] == "user"]
    if not prompts:
        raise Ar2dlmError(f"{source}: no chat or instruction records whose prompts the parent could answer")
    stop_ids = _generation_start(tokenizer).stop_ids
    settings = _Settings(max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, temperature=temperature,
                         answer_temperature=temperature, user_max_new_tokens=0, top_p=1.0, min_chars=1,
                         keep_unfinished=True)
    partial = cache_path.with_name(cache_path.name + ".partial")
    answers = _answer_in_batches(model, tokenizer, [render_chat(tokenizer, p) for p in prompts], stop_ids, settings,
                                 partial)
    tally, answered = _Tally(), {}
    for i, text, done in answers:
        tally.attempted += 1
        reason = _rejection(text, done, settings)
        if reason:
            tally.filtered[f"assistant_{reason}"] += 1
            continue
        tally.unfinished += not done
        answered[i] = {"messages": prompts[i] + [{"role": "assistant", "content": text.strip()}]}
    out = [answered[i] for i in sorted(answered)]
    if not out:
        raise Ar2dlmError(f"{source}: every answer of the parent was empty or degenerate ({dict(tally.filtered)})")
    _write_corpus(cache_path, out, model, _Start(True, "", stop_ids), settings, len(prompts), tally)
    partial.unlink()
    return cache_path


def _answer_in_batches(model, tokenizer, rendered: list[str], stop_ids: list[int], settings: _Settings,
                       partial: Path) -> list[list]:
    """[prompt index, answer text, ended with a stop token] for every prompt, answered in batches of similar length
    (each batch's seed fixed by its place), each finished batch appended to `partial` at once (a run killed and run
    again answers only the batches not there)."""
    from tqdm.auto import tqdm

    order = sorted(range(len(rendered)), key=lambda i: len(rendered[i]))
    size = settings.batch_size
    starts = range(0, len(order), size)
    answers = _resume_answers(partial, {"prompts": len(rendered), **asdict(settings)})
    was_training = model.training
    model.eval()
    try:
        with open(partial, "a", encoding="utf-8") as f, \
                tqdm(total=len(starts), initial=len(answers), desc="parent answers", unit="batch") as bar:
            for start in (s for s in starts if s not in answers):
                batch = order[start:start + size]
                texts = _sample(model, tokenizer, [rendered[i] for i in batch], stop_ids, settings.max_new_tokens,
                                settings.temperature, settings.top_p, settings.seed + start)
                answers[start] = [[i, text, done] for i, (text, done) in zip(batch, texts)]
                # one line a batch, flushed: a killed run keeps every batch it finished
                f.write(json.dumps({"start": start, "answers": answers[start]}, ensure_ascii=False) + "\n")
                f.flush()
                bar.update()
    finally:
        model.train(was_training)
    return [a for start in starts for a in answers[start]]


def _resume_answers(partial: Path, job: dict) -> dict[int, list]:
    """The batches of parent answers an interrupted run of the same job wrote to `partial` ({batch start: [[prompt
    index, text, ended], ...]}), and `partial` rewritten to hold just its job line and those batches (a line cut off
    by the kill is dropped). Another job's file (other settings or batch size) is started again."""
    answers = {}
    entries = appended_records(partial.read_text(encoding="utf-8")) if partial.is_file() else []
    if entries and entries[0] == {"job": job}:
        answers = {e["start"]: e["answers"] for e in entries[1:] if isinstance(e, dict) and "start" in e}
        log.info("resuming the parent's answers: %d batches already written (%s)", len(answers), partial)
    elif entries:
        log.warning("%s was written for other settings; answering every prompt again", partial)
    with atomic_write(partial) as f:
        f.write(json.dumps({"job": job}) + "\n")
        for start, batch in answers.items():
            f.write(json.dumps({"start": start, "answers": batch}, ensure_ascii=False) + "\n")
    return answers


def _prompt_turns(messages: list[dict]) -> list[dict]:
    """The turns of a conversation before its first assistant turn (what the parent is asked to answer; usable when
    it ends with a user turn)."""
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:first]
