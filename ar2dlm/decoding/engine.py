"""Fast block-diffusion generation: a preallocated KV cache, pluggable commit policies, multi-block decoding,
stop tokens/strings, streaming and batching.

    engine = Engine(dlm, tokenizer)
    res = engine.generate("What is 2 + 2?", max_new_tokens=64, policy="threshold", tau=0.9)
    res.text, res.nfe, res.tpf, res.tokens_per_s, res.ttft_s
    for delta in engine.stream(prompt_ids): print(delta, end="")
    engine.generate_batch([ids_a, ids_b])      # rows of any lengths, each equal to its batch-size-1 result

What a forward does (see `schedule.py` for the regions): it feeds the uncached complete blocks (the prompt's full
blocks on the first forward, the block just finished afterwards) together with the open block(s) whose logits are
needed, so prefill, the one write of a finished block's final K/V and the next block's first denoising step share one
forward; the token-shift logit for the next block's first position falls out of the same forward. Open blocks no used
logit depends on are not fed: with block size 1 and token shift (an AR model run as a dLM, the `ar` path of the
benchmark) a forward feeds just the previous token, like an AR decoder, and a step with nothing to feed makes no model
call. Every step counts as one NFE, so with greedy decoding the NFE and the tokens equal the no-cache
`reference_generate` exactly (with stop tokens the engine may stop earlier: it stops as soon as the decoded prefix
holds a stop, not at the end of the block). Only the positions whose logits are read go through the LM head (on a
CPU in a layout MKL streams about twice as fast as nn.Linear's, see `_logits`).

Attention reads only the slots below the furthest fed position (`SlotKVCache` hands it a view, no copy), with a
[batch, 1, fed, kv_len] boolean mask: block-causal by absolute position, slots at or past each row's fed end masked.
In a batch, rows feed different lengths; short rows are padded with dummy queries that write to and read only one
slot just past every row's fed range, and finished rows stay in the batch as dummy queries (no cache copies when a
row leaves).

"Exactly equal" holds in exact arithmetic: the cached forward attends over a different number of (masked) keys and
batches differently than the reference, so logits may differ in the last bits, and a near-tie could in principle
break the other way; the tests see identical tokens throughout.

Speed (`ar2dlm bench`, SmolLM2-135M and its block-4 conversion, 2-core CPU, 1 thread, 48 new tokens): at batch 1
the `ar` path runs at 1.10x Hugging Face `generate` (0.60x before it fed only what is needed; 1.06x vs 0.71x at batch
8). A block-4 dLM at TPF ~1 stays slower than its parent (0.69x at batch 1): a forward over 4 or 8 positions costs
more than one over a single token, which only more tokens per forward repays.

Not done yet: torch.compile / CUDA graphs (the fed length varies per forward, so shapes are not static); no paged or
shared-prefix cache; in a batch every row attends up to the furthest row's fed end (masked), and a forward feeds
as many queries as its longest row (the others padded); the LM-head shortcuts are tuned for MKL on CPU.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ar2dlm.decoding.cache import SlotKVCache
from ar2dlm.decoding.policies import POLICIES, Policy, Sampling, make_policy
from ar2dlm.decoding.schedule import RowState, Schedule
from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.dlm import BlockDiffusionLM


@dataclass(frozen=True)
class DecodeConfig:
    max_new_tokens: int = 128
    policy: str = "threshold"  # threshold | entropy | steps | ar
    tau: float | None = None  # threshold: confidence in [0, 1] (default 0.9); entropy: nats >= 0 (default 0.5)
    steps_per_forward: int = 2  # k of the `steps` policy
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0  # sampling seed (each row of a batch gets its own generator with this seed)
    stop_token_ids: tuple[int, ...] | None = None  # None: the tokenizer's EOS and <|im_end|> (or the config's EOS)
    stop_strings: tuple[str, ...] = ()  # cut the text before the first occurrence
    block_parallel: bool = False  # multi-block decoding (d3LLM / D2F)
    p_add: float = 0.1  # open a new block when the last opened one is this decoded
    activate_ratio: float = 0.95  # a block must commit every forward once its predecessor is this decoded
    max_open_blocks: int = 4
    cache_delay: int = 1  # forwards a finished block is still fed (recomputed) before its K/V count as cached
    refresh_every: int = 0  # recompute the whole cache every N forwards (0 = never)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise Ar2dlmError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.policy not in POLICIES:
            raise Ar2dlmError(f"unknown decoding policy {self.policy!r} (choose from {', '.join(POLICIES)})")
        self.make_policy()  # validates tau / k
        self.sampling()  # validates temperature / top_p / top_k
        if self.block_parallel and self.policy == "ar":
            raise Ar2dlmError("the ar policy decodes one token a forward; block-parallel needs threshold/entropy/steps")
        for name in ("p_add", "activate_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise Ar2dlmError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_open_blocks < 1 or self.cache_delay < 1 or self.refresh_every < 0:
            raise Ar2dlmError("max_open_blocks and cache_delay must be >= 1, refresh_every >= 0")
        if isinstance(self.stop_strings, str):
            object.__setattr__(self, "stop_strings", (self.stop_strings,))
        if any(not s for s in self.stop_strings):
            raise Ar2dlmError("stop strings must be non-empty")

    def make_policy(self) -> Policy:
        return make_policy(self.policy, self.tau, self.steps_per_forward)

    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.top_k)

    def schedule(self) -> Schedule:
        return Schedule(self.block_parallel, self.p_add, self.activate_ratio, self.max_open_blocks,
                        self.cache_delay, self.refresh_every)


@dataclass
class GenerationResult:
    tokens: list[int]  # generated tokens, up to and including the stop token / the token completing a stop string
    text: str  # decoded without special tokens, cut before a stop string
    nfe: int  # forward passes this sequence took part in
    elapsed_s: float
    ttft_s: float | None  # time to the first committed token
    stop_reason: str  # "eos" | "stop_string" | "length"
    prompt_len: int = 0

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


class TextStream:
    """Iterate to get text deltas; `result` holds the GenerationResult once the iteration is over."""

    def __init__(self, gen: Iterator[str]):
        self._gen = gen
        self.result: GenerationResult | None = None

    def __iter__(self):
        self.result = yield from self._gen


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


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class Engine:
    def __init__(self, dlm: BlockDiffusionLM, tokenizer=None):
        if dlm.attention_backend != "sdpa":
            raise Ar2dlmError("the decoding engine needs the sdpa attention backend (dense boolean masks)")
        self.dlm = dlm.eval()
        self.tokenizer = tokenizer
        self.context = getattr(dlm.hf_config, "max_position_embeddings", None)
        self._head_t_cache: torch.Tensor | None = None  # see _head_t
        self._head_t_key = None

    # ------------------------------------------------------------------------------------------------- API
    def generate(self, prompt, config: DecodeConfig | None = None, **overrides) -> GenerationResult:
        return self.generate_batch([prompt], config, **overrides)[0]

    def generate_batch(self, prompts: Sequence, config: DecodeConfig | None = None, **overrides):
        cfg = dataclasses.replace(config or DecodeConfig(), **overrides)
        run = self._run([self._ids(p) for p in prompts], cfg)
        while True:
            try:
                next(run)
            except StopIteration as stop:
                return stop.value

    def stream(self, prompt, config: DecodeConfig | None = None, **overrides) -> TextStream:
        """Text deltas of the decoded prefix (in order) as forwards commit tokens; `.result` at the end."""
        if self.tokenizer is None:
            raise Ar2dlmError("streaming text needs a tokenizer")
        cfg = dataclasses.replace(config or DecodeConfig(), **overrides)
        return TextStream(self._stream([self._ids(prompt)], cfg))

    # ------------------------------------------------------------------------------------------------ internals
    def _ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise Ar2dlmError("a text prompt needs a tokenizer (or pass token ids)")
            return encode_prompt(self.tokenizer, prompt)
        if isinstance(prompt, torch.Tensor):
            return prompt.reshape(-1).tolist()
        return [int(t) for t in prompt]

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else ""

    def _stop_ids(self, cfg: DecodeConfig) -> set[int]:
        if cfg.stop_token_ids is not None:
            return set(cfg.stop_token_ids)
        return set(default_stop_ids(self.tokenizer, self.dlm.hf_config))

    def _stream(self, prompts: list[list[int]], cfg: DecodeConfig):
        run = self._run(prompts, cfg)
        emitted = ""
        while True:
            try:
                rows = next(run)
            except StopIteration as stop:
                result = stop.value[0]
                if result.text.startswith(emitted) and len(result.text) > len(emitted):
                    yield result.text[len(emitted):]
                return result
            text, _ = _cut_at_stop(self._decode(rows[0].tokens), cfg.stop_strings)
            text = self._hold_back(text, cfg.stop_strings)
            if len(text) > len(emitted) and text.startswith(emitted):
                yield text[len(emitted):]
                emitted = text

    @staticmethod
    def _hold_back(text: str, stops: Sequence[str]) -> str:
        """Drop a tail that may still change: an incomplete UTF-8 character, trailing spaces (detokenizers may clean
        them up once the next token arrives) or the beginning of a stop string."""
        keep = len(text)
        for s in stops:
            for n in range(min(len(s) - 1, keep), 0, -1):
                if text[:keep].endswith(s[:n]):
                    keep -= n
                    break
        text = text[:keep]
        return text.rstrip("\ufffd").rstrip()

    def _check_stops(self, row: RowState, old: int, new: int, stop_ids: set[int], cfg: DecodeConfig,
                     now: float) -> None:
        """Stop tokens and strings, searched only in the part of the decoded prefix that just became final."""
        p0, toks = row.prompt_len, row.toks
        eos_at = next((p + 1 for p in range(old, new) if toks[p] in stop_ids), None)
        hi = eos_at or new
        if cfg.stop_strings and self.tokenizer is not None and hi > old:
            if _cut_at_stop(self._decode(toks[p0:hi]), cfg.stop_strings)[1]:
                for n in range(old + 1, hi + 1):  # the first token that completes a stop string
                    if _cut_at_stop(self._decode(toks[p0:n]), cfg.stop_strings)[1]:
                        return row.finish(n - p0, "stop_string", now)
        if eos_at is not None:
            row.finish(eos_at - p0, "eos", now)
        elif new == row.limit:
            row.finish(row.limit - p0, "length", now)

    def _check_prompt(self, ids: list[int], max_new: int) -> int:
        """The number of tokens to generate: max_new, cut to what the context window leaves."""
        if not ids:
            raise Ar2dlmError("empty prompt")
        if self.context is not None:
            if len(ids) >= self.context:
                raise Ar2dlmError(f"the prompt has {len(ids)} tokens; the model's context window is "
                                  f"{self.context} (max_position_embeddings)")
            max_new = min(max_new, self.context - len(ids))
        return max_new

    @torch.no_grad()
    def _run(self, prompts: list[list[int]], cfg: DecodeConfig):
        """Decode all rows together; yields the rows after each forward, returns the results."""
        if not prompts:
            raise Ar2dlmError("no prompts")
        if cfg.stop_strings and self.tokenizer is None:
            raise Ar2dlmError("stop strings need a tokenizer")
        dlm, c = self.dlm, self.dlm.config
        sched, policy, sampling, stop_ids = cfg.schedule(), cfg.make_policy(), cfg.sampling(), self._stop_ids(cfg)
        rows = [RowState(ids, self._check_prompt(ids, cfg.max_new_tokens), c.block_size, c.mask_token_id,
                         c.token_shift, sched, policy.leftmost_only) for ids in prompts]
        gens = [None] * len(rows)
        if not sampling.greedy:
            gens = [torch.Generator(device=dlm.device).manual_seed(cfg.seed) for _ in rows]
        cache_len = max(r.limit for r in rows) + 1  # + one spare slot for padding queries
        cache = SlotKVCache(dlm.hf_config.num_hidden_layers, cache_len)
        blk = torch.arange(cache_len, device=dlm.device) // c.block_size  # the block of every slot
        t0 = time.perf_counter()
        while not all(r.done for r in rows):
            active = [i for i, r in enumerate(rows) if not r.done]
            plans = {i: rows[i].plan() for i in active}
            logits = self._forward(rows, plans, cache, blk)
            now = time.perf_counter() - t0
            for i in active:
                old, new = rows[i].apply(plans[i], logits.get(i), policy, sampling, gens[i], now)
                if new > old:
                    self._check_stops(rows[i], old, new, stop_ids, cfg, now)
            yield rows
        results = []
        for r in rows:
            text, _ = _cut_at_stop(self._decode(r.tokens), cfg.stop_strings)
            results.append(GenerationResult(r.tokens, text, r.nfe, r.t_end, r.t_first, r.stop_reason, r.prompt_len))
        return results

    def _forward(self, rows: list[RowState], plans: dict, cache: SlotKVCache, blk: torch.Tensor) -> dict:
        """One batched forward over what the plans feed. Returns, per row whose plan needs logits, one row of logits
        per position of its `logit_pos`; when no row feeds anything, there is no forward at all."""
        fed = {i: p for i, p in plans.items() if p.fed}
        if not fed:
            return {}
        dev, n = self.dlm.device, len(rows)
        q = max(p.fed for p in fed.values())
        kv_len = max(p.fed_end for p in fed.values())  # attention reads slots [0, kv_len) only
        if n == 1:  # one sequence: no padding, the fed range is contiguous
            p = fed[0]
            ids = torch.tensor([rows[0].toks[p.fed_start:p.fed_end]], device=dev)
            pos = torch.arange(p.fed_start, p.fed_end, device=dev)[None]
            mask = (blk[None, :kv_len] <= blk[p.fed_start:p.fed_end, None])[None, None]
        else:
            # Shorter rows are padded with dummy queries, finished (or idle) rows are all dummy queries: they write
            # to and read only slot `pad`, at or past every active row's fed end (so never one of its cached slots).
            # That slot is either unused or one the row will write again (with real tokens) before it reads it.
            pad = max(p.fed_end for p in plans.values())
            kv_len = pad + 1
            mask_id = self.dlm.config.mask_token_id
            id_rows, pos_rows, ends = [], [], []
            for i, r in enumerate(rows):
                p = fed.get(i)
                lo, hi = (p.fed_start, p.fed_end) if p else (0, 0)
                id_rows.append(r.toks[lo:hi] + [mask_id] * (q - hi + lo))
                pos_rows.append(list(range(lo, hi)) + [pad] * (q - hi + lo))
                ends.append(hi)
            ids = torch.tensor(id_rows, device=dev)
            pos = torch.tensor(pos_rows, device=dev)
            key = torch.arange(kv_len, device=dev)
            visible = (blk[None, None, :kv_len] <= blk[pos][..., None]) & (key < torch.tensor(ends, device=dev)[:, None,
                                                                                                                None])
            mask = torch.where((pos < pad)[..., None], visible, key == pad)[:, None]
        cache.set_write_index(pos, kv_len)
        out = self.dlm.backbone.get_decoder()(inputs_embeds=self.dlm.embed(ids), attention_mask=mask,
                                              position_ids=pos, past_key_values=cache, use_cache=True)
        hidden = out.last_hidden_state
        # Only the positions whose logits are used go through the LM head.
        picks = {i: [x - p.fed_start for x in p.logit_pos] for i, p in fed.items() if p.logit_pos}
        if not picks:
            return {}
        if n == 1:
            cols = picks[0]
            h = hidden[0, cols[0]:cols[-1] + 1] if cols[-1] - cols[0] + 1 == len(cols) else hidden[0, cols]
        else:
            h = hidden[[i for i, c in picks.items() for _ in c], [x for c in picks.values() for x in c]]
        flat = self._logits(h)
        return dict(zip(picks, flat.split([len(c) for c in picks.values()])))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`dlm.logits` of the few rows [N, H] a forward needs, faster on a CPU. MKL runs the LM head's thin
        products far below memory speed in nn.Linear's layout (h @ W^T): for one row (the AR case) the engine keeps
        a transposed copy of the head weight, which streams twice as fast; for 2-8 rows it computes W @ h^T, which
        is faster without any copy. The values are the same up to rounding."""
        head = self.dlm.backbone.get_output_embeddings()
        n = hidden.shape[0]
        if hidden.device.type != "cpu" or n > 8 or type(head) is not torch.nn.Linear or head.bias is not None:
            return self.dlm.logits(hidden)
        if n == 1:
            out = hidden @ self._head_t(head.weight)
        else:
            out = torch.mm(head.weight, hidden.t()).t().contiguous()
        out[:, self.dlm.config.mask_token_id] = torch.finfo(out.dtype).min
        return out

    def _head_t(self, weight: torch.Tensor) -> torch.Tensor:
        """The LM-head weight transposed to [H, V] and contiguous; rebuilt when the weight changes (any in-place
        update bumps its version). Costs one more copy of the head weight in memory, on CPU only."""
        key = (weight.data_ptr(), weight._version, weight.dtype)
        if self._head_t_key != key:
            self._head_t_cache = weight.detach().t().contiguous()
            self._head_t_key = key
        return self._head_t_cache
