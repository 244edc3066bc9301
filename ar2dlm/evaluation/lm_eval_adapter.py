"""The lm-evaluation-harness model `ar2dlm`: a converted dLM (or a plain AR model as a block-size-1 dLM) in lm_eval.

    ar2dlm lm-eval --model ar2dlm --model_args pretrained=runs/dlm/model,policy=threshold,tau=0.9 --tasks gsm8k

lm_eval finds models only in its own registry (no plugin entry points), so importing this module registers the class
under "ar2dlm"; the command above (`ar2dlm/recipes/lm_eval.py`) imports it, then hands its arguments to lm_eval's own
command line unchanged. From Python: `import ar2dlm.evaluation.lm_eval_adapter` and then
`lm_eval.simple_evaluate(model="ar2dlm", ...)`.

Request types:
  * generate_until: our cached decoding engine (batched), with the model_args' decoding settings (every field of
    `DecodeParams`: policy, tau, steps_per_forward, block_parallel, p_add, activate_ratio, max_open_blocks, ...);
    the request's `until` strings (added to any model_args `stop_strings`) stop decoding and cut the text,
    `max_gen_toks` caps it, `do_sample` / `temperature` / `top_p` / `top_k` set the sampling (greedy unless
    do_sample; a sampled request without its own temperature/top_p/top_k takes the model_args'). EOS and <|im_end|>
    stop as well.
  * loglikelihood: for a dLM this is NOT the exact log-likelihood (a dLM has none in closed form) but minus a
    Monte Carlo estimate of the block-diffusion negative ELBO of the continuation given the context
    (`ar2dlm.evaluation.likelihood`, `samples` draws, seeded per request by `seed` and the request's tokens): a
    lower bound on the log-likelihood in expectation, noisy by the estimator's spread. At block size 1 it is exact.
    `is_greedy` is exact: whether left-to-right greedy decoding (the engine's `ar` policy: one token a forward,
    later positions of the block masked) would produce the continuation.
  * loglikelihood_rolling: the same bound over lm_eval's rolling windows of the model's context, summed.

model_args: pretrained (required), samples, seed (sampling and the bound's draws), max_length, max_gen_toks (the
answer length unless the task sets it), add_bos_token, and the decoding settings above; lm_eval's --batch_size and
--device are honoured ("auto" batch size means 8).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zlib
from collections import Counter, defaultdict

import torch

from ar2dlm.engine import DecodeParams
from ar2dlm.errors import Ar2dlmError

try:
    import lm_eval.models  # noqa: F401  (fills the registry first: get_model imports built-ins only into an empty one)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import MODEL_REGISTRY, register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - depends on the environment
    raise Ar2dlmError(f"the lm-eval adapter needs lm-evaluation-harness: pip install 'ar2dlm[eval]' ({e})") from None

log = logging.getLogger(__name__)
MODEL_NAME = "ar2dlm"
DEFAULT_BATCH_SIZE = 8
_GEN_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k")
_OWN_ARGS = ("pretrained", "samples", "max_length", "max_gen_toks", "add_bos_token")
# The decoding settings a model_arg may give: every command-line field of DecodeParams except the answer length,
# which is lm_eval's max_gen_toks (stop token ids are the model's own).
_DECODE_ARGS = tuple(f.name for f in dataclasses.fields(DecodeParams)
                     if f.metadata.get("cli", True) and f.name != "max_new_tokens")


def decode_params_from_model_args(values: dict) -> DecodeParams:
    """The DecodeParams of the model_args' decoding settings (lm_eval hands them over as text, numbers or booleans);
    any other name is a typo, one error line."""
    unknown = sorted(set(values) - set(_DECODE_ARGS))
    if unknown:
        raise Ar2dlmError(f"unknown ar2dlm model_args: {', '.join(unknown)} (accepted: "
                          f"{', '.join(_OWN_ARGS + _DECODE_ARGS)})")
    return DecodeParams.from_mapping(values)


class Ar2dlmLM(TemplateLM):
    def __init__(self, pretrained: str, samples: int = 8, max_length: int | None = None, max_gen_toks: int = 256,
                 add_bos_token: bool = False, batch_size: int | str | None = None,
                 max_batch_size: int | None = None, device: str | None = None, **decode_args):
        super().__init__()
        from ar2dlm.engine import Engine
        from ar2dlm.model.open import context_length, open_for_decoding
        from ar2dlm.utils.devices import resolve_device

        self._decode = decode_params_from_model_args(decode_args)  # validated before anything loads
        if int(samples) < 1:
            raise Ar2dlmError(f"samples must be >= 1, got {samples}")
        self.samples, self.seed, self.max_gen_toks = int(samples), self._decode.seed, int(max_gen_toks)
        self.add_bos_token = bool(add_bos_token)
        self.batch_size = _batch_size(batch_size)
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            log.warning("device %s requested but no CUDA GPU is available: using the CPU", device)
            device = "cpu"
        self._device = resolve_device(device)
        self.dlm, self.tokenizer, _ = open_for_decoding(str(pretrained), device=self._device)
        self.engine = Engine(self.dlm, self.tokenizer)
        context = context_length(self.dlm) or 2048
        self.max_length = int(max_length) if max_length else context
        if self.max_length < 2:
            raise Ar2dlmError(f"max_length must be >= 2, got {max_length}")
        self.pretrained = str(pretrained)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        self.request_counts: Counter = Counter()  # requests answered, by type (for tests and logs)

    # ----------------------------------------------------------------------------------------------- tokens
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        special = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return list(self.tokenizer(string, add_special_tokens=special)["input_ids"])

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # ----------------------------------------------------------------------------------------------- scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids) -> (log-lik bound, greedy)."""
        from tqdm import tqdm

        from ar2dlm.evaluation.likelihood import diffusion_nll, greedy_match, make_batch, row_seed

        c = self.dlm.config
        rows = []
        for _, ctx, cont in requests:
            ctx, cont = list(ctx), list(cont)
            if len(cont) >= self.max_length:
                raise Ar2dlmError(f"a continuation of {len(cont)} tokens does not fit the context of "
                                  f"{self.max_length} tokens with at least one token to condition on")
            if not ctx:
                ctx = [self.prefix_token_id]
            seq = (ctx + cont)[-self.max_length:]  # keep the continuation, cut the context from the left
            rows.append((seq, [False] * (len(seq) - len(cont)) + [True] * len(cont)))
        results: list = [None] * len(rows)
        for i, (_, maskable) in enumerate(rows):
            if not maskable[-1:] == [True]:
                results[i] = (0.0, True)  # an empty continuation: probability 1
        order = sorted((i for i in range(len(rows)) if results[i] is None), key=lambda i: -len(rows[i][0]))
        bar = tqdm(total=len(order), desc="ar2dlm loglikelihood", disable=disable_tqdm or self.rank != 0)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = make_batch([rows[i] for i in idx], c.block_size, c.mask_token_id, self.pad_id, self.max_length)
            # seeded by content: the same request gets the same draws whatever its position or batch
            seeds = [row_seed((self.seed, zlib.crc32(json.dumps(rows[i][0]).encode()), len(rows[i][0])))
                     for i in idx]
            nll = diffusion_nll(self.dlm, batch, self.samples, seeds).mean(0)
            greedy = greedy_match(self.dlm, batch)
            for j, i in enumerate(idx):
                results[i] = (-float(nll[j]), bool(greedy[j]))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            bar.update(len(idx))
        bar.close()
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self.request_counts["loglikelihood"] += len(requests)
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        self.request_counts["loglikelihood_rolling"] += len(requests)
        windows, owner = [], []
        for n, req in enumerate(requests):
            (text,) = req.args
            # context + prediction of a window is at most max_length tokens: the whole of it is the dLM's input
            for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text, add_special_tokens=False), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length - 1, context_len=1)):
                windows.append((None, ctx, pred))
                owner.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (ll, _) in zip(owner, scores):
            totals[n] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ----------------------------------------------------------------------------------------------- generation
    def _decode_config(self, gen_kwargs: dict) -> DecodeParams:
        """The model_args' settings with one request's generation kwargs: its stops, length and sampling."""
        kw = dict(gen_kwargs or {})
        ignored = sorted(set(kw) - set(_GEN_KEYS))
        if ignored:
            log.warning("ar2dlm ignores generation kwargs %s", ", ".join(ignored))
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        base = self._decode
        stops = base.stop_strings + tuple(s for s in until if s and s not in base.stop_strings)
        length = int(kw.get("max_gen_toks", self.max_gen_toks))
        if not kw.get("do_sample", False):
            return base.replace(max_new_tokens=length, temperature=0.0, top_p=1.0, top_k=0, stop_strings=stops)
        return base.replace(
            max_new_tokens=length, temperature=float(kw.get("temperature", base.temperature or 1.0)),
            top_p=float(kw.get("top_p") or base.top_p), top_k=int(kw.get("top_k") or base.top_k), stop_strings=stops)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm import tqdm

        self.request_counts["generate_until"] += len(requests)
        out: list = [None] * len(requests)
        groups = defaultdict(list)  # one decode setting per group: requests of a task share their gen_kwargs
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        bar = tqdm(total=len(requests), desc="ar2dlm generate_until", disable=disable_tqdm or self.rank != 0)
        for idx in groups.values():
            dcfg = self._decode_config(requests[idx[0]].args[1])
            room = max(self.max_length - dcfg.max_new_tokens, 1)
            ids = {i: (self.tok_encode(requests[i].args[0]) or [self.prefix_token_id])[-room:] for i in idx}
            idx = sorted(idx, key=lambda i: -len(ids[i]))  # similar lengths together: less padding work
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                for i, res in zip(chunk, self.engine.generate_batch([ids[i] for i in chunk], dcfg)):
                    out[i] = res.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, res.text)
                bar.update(len(chunk))
        bar.close()
        return out


def _batch_size(value) -> int:
    if value is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(value, str):
        if value.startswith("auto"):
            return DEFAULT_BATCH_SIZE
        try:
            value = int(value)
        except ValueError:
            raise Ar2dlmError(f"batch size must be an integer or 'auto', got {value!r}") from None
    if int(value) < 1:
        raise Ar2dlmError(f"batch size must be >= 1, got {value}")
    return int(value)


if MODEL_NAME not in MODEL_REGISTRY:
    register_model(MODEL_NAME)(Ar2dlmLM)
