"""`ar2dlm compare`: the AR parent and the dLM answer the same prompts, side by side.

For each prompt: the parent's greedy answer (Hugging Face `generate`), the dLM's answer with the threshold policy at
each `--thresholds` value (cached engine; the other decoding options apply), the dLM's tokens per forward (TPF), and
whether the two answers agree (exactly, and as a share of matching leading tokens). This is the quick sanity check
after a conversion; `ar2dlm eval` is the full evaluation.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field

import torch

from ar2dlm.engine import DecodeParams, Engine, default_stop_ids, encode_prompt
from ar2dlm.engine.params import add_decode_args, decode_params_from_args
from ar2dlm.errors import Ar2dlmError
from ar2dlm.evaluation.agreement import leading_agreement, load_prompts, trim_at_stop
from ar2dlm.utils.cli_config import add_dataclass_args, dataclass_from_args
from ar2dlm.utils.files import check_output_file, write_json

# One line under the table, so the columns need no documentation hunt.
LEGEND = ("threshold: the dLM commits the tokens more confident than this (at least one a forward); TPF: tokens per "
          "forward (1.00 = no parallelism); exact agree: prompts answered exactly as the parent did; leading agree: "
          "mean share of the answer both begin with alike")

DECODE_DEFAULTS = {"max_new_tokens": 96}
DECODE_SKIP = ("policy", "tau")  # the threshold policy, at every --thresholds value


@dataclass
class CompareConfig:
    model: str = field(default="smollm2-135m-gated-dlm", metadata={
        "help": "converted dLM folder or shipped dLM name (a feature drafter decodes only with verify: bench it)"})
    base: str | None = field(default=None, metadata={"help": "AR parent (default: the one recorded in the dLM)"})
    prompts: str | None = field(default=None, metadata={"help": "file with one prompt per line (default: built-in)"})
    thresholds: str = field(default="0.9,0.5", metadata={"help": "comma-separated confidence thresholds"})
    json_out: str | None = field(default=None, metadata={"help": "also write the results here"})
    decode: DecodeParams = field(default_factory=lambda: DecodeParams(**DECODE_DEFAULTS), metadata={"cli": False})

    def __post_init__(self):
        self.taus()
        check_output_file(self.json_out, "--json-out")

    def taus(self) -> list[float]:
        try:
            taus = [float(t) for t in self.thresholds.split(",")]
        except ValueError:
            raise Ar2dlmError(f"--thresholds must be comma-separated numbers, got {self.thresholds!r}") from None
        if not taus or any(not 0 <= t <= 1 for t in taus):
            raise Ar2dlmError("every threshold must be in [0, 1]")
        return taus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, CompareConfig)
    add_decode_args(parser, defaults=DECODE_DEFAULTS, skip=DECODE_SKIP)


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    return dataclass_from_args(CompareConfig, args, decode=decode_params_from_args(args))


def _parent_answer(parent, tokenizer, ids: list[int], max_new_tokens: int, stops) -> tuple[list[int], float]:
    """The parent's greedy answer (cut after its first stop token) and the seconds it took."""
    t0 = time.perf_counter()
    out = parent.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(stops),
                          pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
    return trim_at_stop(out[0, len(ids):].tolist(), stops), time.perf_counter() - t0


def _dlm_answer(engine: Engine, ids: list[int], params: DecodeParams, ar_tokens: list[int]) -> dict:
    res = engine.generate(ids, params)
    return {"threshold": params.tau, "text": engine.tokenizer.decode(res.tokens, skip_special_tokens=True),
            "tokens": len(res.tokens), "nfe": res.nfe, "tpf": res.tpf, "tokens_per_s": res.tokens_per_s,
            "exact_match": res.tokens == ar_tokens, "leading_agreement": leading_agreement(res.tokens, ar_tokens)}


def _print_row(i: int, n: int, row: dict) -> None:
    print(f"[{i + 1}/{n}] {row['prompt'][:60]!r}")
    print(f"    AR parent : {row['ar_text'][:160]!r}")
    for d in row["dlm"]:
        print(f"    dLM t={d['threshold']:<4}: TPF {d['tpf']:.2f}  {'agree' if d['exact_match'] else 'differ'}  "
              f"{d['text'][:160]!r}")


def _threshold_summary(rows: list[dict], k: int, tau: float) -> dict:
    """TPF, agreement and speed of the k-th threshold over all prompts (token-weighted where it matters)."""
    answers = [r["dlm"][k] for r in rows]
    tokens, nfe = sum(a["tokens"] for a in answers), sum(a["nfe"] for a in answers)
    secs = sum(a["tokens"] / max(a["tokens_per_s"], 1e-9) for a in answers)
    return {"threshold": tau, "tpf": tokens / max(nfe, 1),
            "exact_agreement": sum(a["exact_match"] for a in answers) / len(rows),
            "leading_agreement": sum(a["leading_agreement"] for a in answers) / len(rows),
            "tokens_per_s": tokens / max(secs, 1e-9)}


@torch.no_grad()
def run(cfg: CompareConfig) -> dict:
    from ar2dlm.model.loading import load_base
    from ar2dlm.model.open import check_not_run_folder, load_dlm, parent_spec

    prompts = load_prompts(cfg.prompts)  # before the models load; an empty file would divide by zero below
    check_not_run_folder(cfg.model)
    dlm, tokenizer = load_dlm(cfg.model)
    dlm.eval()
    base_name = parent_spec(dlm, cfg.base)
    parent, _ = load_base(base_name)
    parent.eval()
    stops = default_stop_ids(tokenizer)
    chat = bool(getattr(tokenizer, "chat_template", None))
    settings = [cfg.decode.replace(policy="threshold", tau=tau, stop_token_ids=stops) for tau in cfg.taus()]
    engine = Engine(dlm, tokenizer)
    rows = []
    for i, prompt in enumerate(prompts):
        ids = encode_prompt(tokenizer, prompt, chat=chat)
        ar_tokens, ar_s = _parent_answer(parent, tokenizer, ids, cfg.decode.max_new_tokens, stops)
        rows.append({"prompt": prompt, "ar_text": tokenizer.decode(ar_tokens, skip_special_tokens=True),
                     "ar_tokens": len(ar_tokens), "ar_tokens_per_s": len(ar_tokens) / ar_s,
                     "dlm": [_dlm_answer(engine, ids, params, ar_tokens) for params in settings]})
        _print_row(i, len(prompts), rows[-1])

    ar_secs = sum(r["ar_tokens"] / r["ar_tokens_per_s"] for r in rows)
    summary = {"model": cfg.model, "base": base_name, "prompts": len(prompts),
               "ar_tokens_per_s": sum(r["ar_tokens"] for r in rows) / ar_secs,
               "per_threshold": [_threshold_summary(rows, k, p.tau) for k, p in enumerate(settings)]}
    print(f"\nAR parent (HF generate, greedy): {summary['ar_tokens_per_s']:.1f} tokens/s")
    print(f"{'threshold':>9}{'TPF':>7}{'tokens/s':>10}{'exact agree':>13}{'leading agree':>15}")
    for s in summary["per_threshold"]:
        print(f"{s['threshold']:>9}{s['tpf']:>7.2f}{s['tokens_per_s']:>10.1f}{s['exact_agreement']:>12.0%}"
              f"{s['leading_agreement']:>14.0%}")
    print(LEGEND)
    result = {"config": asdict(cfg), "summary": summary, "rows": rows}
    if cfg.json_out:
        write_json(cfg.json_out, result)
    return result
