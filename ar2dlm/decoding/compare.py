"""`ar2dlm compare`: the AR parent and the dLM answer the same prompts, side by side.

For each prompt: the parent's greedy answer (Hugging Face `generate`), the dLM's answer with the threshold policy (cached engine),
the dLM's tokens per forward (TPF), and whether the two answers agree (exactly, and as a share of matching leading
tokens). This is the quick sanity check after a conversion; `ar2dlm eval` is the full evaluation.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from ar2dlm.engine import Engine, default_stop_ids, encode_prompt
from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.dlm import BlockDiffusionLM
from ar2dlm.model.loading import load_base
from ar2dlm.utils.files import check_output_file, write_json

DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Write a Python function that returns the largest number in a list.",
    "Give me three tips for sleeping better.",
    "Explain what photosynthesis is in two sentences.",
    "A train travels 60 miles per hour for 3 hours. How far does it go?",
    "What is the difference between a list and a tuple in Python?",
    "Write a short poem about the sea.",
]


@dataclass
class CompareConfig:
    model: str = field(default="runs/smollm2-135m-dlm/model", metadata={"help": "converted dLM folder"})
    base: str | None = field(default=None, metadata={"help": "AR parent (default: the one recorded in the dLM)"})
    prompts: str | None = field(default=None, metadata={"help": "file with one prompt per line (default: built-in)"})
    thresholds: str = field(default="0.9,0.5", metadata={"help": "comma-separated confidence thresholds"})
    max_new_tokens: int = field(default=96, metadata={"help": "tokens per answer"})
    json_out: str | None = field(default=None, metadata={"help": "also write the results here"})

    def __post_init__(self):
        try:
            taus = [float(t) for t in self.thresholds.split(",")]
        except ValueError:
            raise Ar2dlmError(f"--thresholds must be comma-separated numbers, got {self.thresholds!r}") from None
        if not taus or any(not 0 <= t <= 1 for t in taus):
            raise Ar2dlmError("every threshold must be in [0, 1]")
        if self.max_new_tokens < 1:
            raise Ar2dlmError("--max-new-tokens must be >= 1")
        check_output_file(self.json_out, "--json-out")


def load_prompts(path: str | None) -> list[str]:
    """One prompt per non-blank line of `path` (the built-in ones without a path); none at all is an error."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [ln.strip() for ln in f if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise Ar2dlmError(f"cannot read prompts from {path}: {e}") from None
    if not prompts:
        raise Ar2dlmError(f"no prompts in {path} (one prompt per line)")
    return prompts


def trim_at_stop(tokens: list[int], stops) -> list[int]:
    """The tokens up to and including the first stop token."""
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[: i + 1]
    return tokens


def leading_agreement(a: list[int], b: list[int]) -> float:
    """Share of the longer answer covered by the common prefix (1.0 = identical)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n / max(len(a), len(b), 1)


@torch.no_grad()
def run_compare(cfg: CompareConfig) -> dict:
    prompts = load_prompts(cfg.prompts)  # before the models load; an empty file would divide by zero below
    dlm, tokenizer = BlockDiffusionLM.from_pretrained(cfg.model)
    dlm.eval()
    base_name = cfg.base or dlm.config.base_model
    if base_name is None:
        raise Ar2dlmError("the dLM does not record its AR parent: pass --base")
    parent, _ = load_base(base_name)
    parent.eval()
    stops = default_stop_ids(tokenizer)
    chat = bool(getattr(tokenizer, "chat_template", None))
    taus = [float(t) for t in cfg.thresholds.split(",")]
    engine = Engine(dlm, tokenizer)
    rows = []
    for i, prompt in enumerate(prompts):
        ids = encode_prompt(tokenizer, prompt, chat=chat)
        t0 = time.perf_counter()
        out = parent.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=cfg.max_new_tokens, do_sample=False, eos_token_id=list(stops),
                              pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
        ar_s = time.perf_counter() - t0
        ar_tokens = trim_at_stop(out[0, len(ids):].tolist(), stops)
        row = {"prompt": prompt, "ar_text": tokenizer.decode(ar_tokens, skip_special_tokens=True),
               "ar_tokens": len(ar_tokens), "ar_tokens_per_s": len(ar_tokens) / ar_s, "dlm": []}
        for tau in taus:
            res = engine.generate(ids, max_new_tokens=cfg.max_new_tokens, policy="threshold", tau=tau,
                                  stop_token_ids=stops)
            row["dlm"].append({
                "threshold": tau, "text": tokenizer.decode(res.tokens, skip_special_tokens=True),
                "tokens": len(res.tokens), "nfe": res.nfe, "tpf": res.tpf, "tokens_per_s": res.tokens_per_s,
                "exact_match": res.tokens == ar_tokens, "leading_agreement": leading_agreement(res.tokens, ar_tokens),
            })
        rows.append(row)
        print(f"[{i + 1}/{len(prompts)}] {prompt[:60]!r}")
        print(f"    AR parent : {row['ar_text'][:160]!r}")
        for d in row["dlm"]:
            print(f"    dLM t={d['threshold']:<4}: TPF {d['tpf']:.2f}  {'agree' if d['exact_match'] else 'differ'}  "
                  f"{d['text'][:160]!r}")

    summary = {"model": cfg.model, "base": base_name, "prompts": len(prompts), "per_threshold": [],
               "ar_tokens_per_s": sum(r["ar_tokens"] for r in rows) / sum(r["ar_tokens"] / r["ar_tokens_per_s"]
                                                                         for r in rows)}
    print(f"\nAR parent (HF generate, greedy): {summary['ar_tokens_per_s']:.1f} tokens/s")
    print(f"{'threshold':>9}{'TPF':>7}{'tokens/s':>10}{'exact agree':>13}{'leading agree':>15}")
    for k, tau in enumerate(taus):
        tokens = sum(r["dlm"][k]["tokens"] for r in rows)
        nfe = sum(r["dlm"][k]["nfe"] for r in rows)
        exact = sum(r["dlm"][k]["exact_match"] for r in rows) / len(rows)
        lead = sum(r["dlm"][k]["leading_agreement"] for r in rows) / len(rows)
        secs = sum(r["dlm"][k]["tokens"] / max(r["dlm"][k]["tokens_per_s"], 1e-9) for r in rows)
        summary["per_threshold"].append({"threshold": tau, "tpf": tokens / max(nfe, 1), "exact_agreement": exact,
                                         "leading_agreement": lead, "tokens_per_s": tokens / max(secs, 1e-9)})
        print(f"{tau:>9}{tokens / max(nfe, 1):>7.2f}{tokens / max(secs, 1e-9):>10.1f}{exact:>12.0%}{lead:>14.0%}")
    result = {"config": asdict(cfg), "summary": summary, "rows": rows}
    if cfg.json_out:
        write_json(cfg.json_out, result)
    return result
