"""The lm-evaluation-harness model `ar2dlm`: a converted dLM (or a plain AR model as a block-size-1 dLM) in lm_eval.

    ar2dlm lm-eval --model ar2dlm --model_args pretrained=runs/dlm/model,policy=threshold,tau=0.9 --tasks gsm8k
    python -m ar2dlm.evaluation.lm_eval_adapter --model ar2dlm --model_args pretrained=... --tasks ...

lm_eval finds models only in its own registry (no plugin entry points), so importing this module registers the class
under "ar2dlm"; both commands above import it, then hand their arguments to lm_eval's own command line unchanged.
From Python: `import ar2dlm.evaluation.lm_eval_adapter` and then `lm_eval.simple_evaluate(model="ar2dlm", ...)`.

Request types:
  * generate_until: our cached decoding engine (batched), with the model_args' policy / tau / block_parallel; the
    request's `until` strings stop decoding and cut the text, `max_gen_toks` caps it, `temperature`/`do_sample`/
    `top_p`/`top_k` set the sampling (greedy unless do_sample). EOS and <|im_end|> stop as well.
  * loglikelihood: for a dLM this is NOT the exact log-likelihood (a dLM has none in closed form) but minus a
    Monte Carlo estimate of the block-diffusion negative ELBO of the continuation given the context
    (`ar2dlm.evaluation.likelihood`, `samples` draws, seeded per request by `seed` and the request's tokens): a
    lower bound on the log-likelihood in expectation, noisy by the estimator's spread. At block size 1 it is exact.
    `is_greedy` is exact: whether left-to-right greedy decoding (the engine's `ar` policy: one token a forward,
    later positions of the block masked) would produce the continuation.
  * loglikelihood_rolling: the same bound over lm_eval's rolling windows of the model's context, summed.

model_args: pretrained (required), policy, tau, steps_per_forward, block_parallel, samples, seed, max_length,
max_gen_toks, add_bos_token; lm_eval's --batch_size and --device are honoured ("auto" batch size means 8).
"""

from __future__ import annotations

import json
import logging
import sys
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import torch

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


class Ar2dlmLM(TemplateLM):
    def __init__(self, pretrained: str, policy: str = "threshold", tau: float | None = None,
                 steps_per_forward: int = 2, block_parallel: bool = False, samples: int = 8, seed: int = 0,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool = False,
                 batch_size: int | str | None = None, max_batch_size: int | None = None, device: str | None = None,
                 **unknown):
        super().__init__()
        if unknown:
            raise Ar2dlmError(f"unknown ar2dlm model_args: {', '.join(sorted(unknown))} (accepted: pretrained, "
                              "policy, tau, steps_per_forward, block_parallel, samples, seed, max_length, "
                              "max_gen_toks, add_bos_token)")
        from ar2dlm.engine import DecodeParams, Engine
        from ar2dlm.evaluation.runner import load_model
        from ar2dlm.utils.devices import resolve_device

        if int(samples) < 1:
            raise Ar2dlmError(f"samples must be >= 1, got {samples}")
        # validate the decode settings before loading anything
        self._decode = DecodeParams(policy=str(policy), tau=tau, steps_per_forward=int(steps_per_forward),
                                    block_parallel=bool(block_parallel), seed=int(seed))
        self.samples, self.seed, self.max_gen_toks = int(samples), int(seed), int(max_gen_toks)
        self.add_bos_token = bool(add_bos_token)
        self.batch_size = _batch_size(batch_size)
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            log.warning("device %s requested but no CUDA GPU is available: using the CPU", device)
            device = "cpu"
        self._device = resolve_device(device)
        self.dlm, self.tokenizer, _ = load_model(str(pretrained))
        self.dlm = self.dlm.to(self._device).eval()
        self.engine = Engine(self.dlm, self.tokenizer)
        context = getattr(self.dlm.hf_config, "max_position_embeddings", None) or 2048
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
    def _decode_config(self, gen_kwargs: dict):
        import dataclasses

        kw = dict(gen_kwargs or {})
        ignored = sorted(set(kw) - set(_GEN_KEYS))
        if ignored:
            log.warning("ar2dlm ignores generation kwargs %s", ", ".join(ignored))
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        do_sample = bool(kw.get("do_sample", False))
        temperature = float(kw.get("temperature", 1.0 if do_sample else 0.0)) if do_sample else 0.0
        return dataclasses.replace(
            self._decode, max_new_tokens=int(kw.get("max_gen_toks", self.max_gen_toks)), temperature=temperature,
            top_p=float(kw.get("top_p") or 1.0) if do_sample else 1.0,
            top_k=int(kw.get("top_k") or 0) if do_sample else 0, stop_strings=tuple(s for s in until if s))

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


# Under `python -m` this file also runs as __main__; the class registered is the importable module's one.
if __name__ != "__main__" and MODEL_NAME not in MODEL_REGISTRY:
    register_model(MODEL_NAME)(Ar2dlmLM)


def run_cli(argv: list[str]) -> int:
    """lm_eval's own command line with `ar2dlm` registered; `--model ar2dlm` is added when no --model is given."""
    from lm_eval.__main__ import cli_evaluate

    args = list(argv)
    sub = 1 if args and args[0] == "run" else 0
    if (not args or args[0] not in ("ls", "validate")) and not any(a == "--model" or a.startswith("--model=")
                                                                   for a in args):
        args[sub:sub] = ["--model", MODEL_NAME]
    saved = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    except ValueError as e:
        # lm_eval checks its arguments (unknown task names, --limit with --samples, a bad config YAML) in its config
        # module with ValueErrors: those are the user's, one line. A ValueError from anywhere else stays a bug.
        if _raised_in_lm_eval_config(e):
            raise Ar2dlmError(str(e).splitlines()[0] if str(e) else "invalid lm_eval arguments") from None
        raise
    finally:
        sys.argv = saved
    return 0


def _raised_in_lm_eval_config(e: BaseException) -> bool:
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).parent.parts[-2:] == ("lm_eval", "config")


if __name__ == "__main__":
    from ar2dlm.evaluation import lm_eval_adapter  # registers the model

    try:
        sys.exit(lm_eval_adapter.run_cli(sys.argv[1:]))
    except Ar2dlmError as e:
        print(f"ar2dlm: error: {e}", file=sys.stderr)
        sys.exit(2)
