"""Tiny random-initialised models and an offline tokenizer for tests (no hub, runs in seconds on a CPU)."""

from __future__ import annotations

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "Natalia sold 48 clips in April and half as many in May. How many clips did she sell?",
    "def add(a, b):\n    return a + b\n",
    "0 1 2 3 4 5 6 7 8 9 10 + - * / = #### answer question user assistant system",
]


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained in memory, with ChatML special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(family: str = "llama", vocab_size: int = 300, **overrides):
    """A 2-layer config of the given family, small enough for many forward passes per second on a CPU."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=2,
        bos_token_id=1, eos_token_id=2,
    )
    common.update(overrides)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    if family == "qwen3":
        common.setdefault("head_dim", 16)
    return cls(**common)


def tiny_model(family: str = "llama", seed: int = 0, vocab_size: int = 300, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, vocab_size=vocab_size, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


def tiny_base(tmp_path, family: str = "llama", seed: int = 0):
    """Save a tiny model + tokenizer as a local HF folder and return its path (a stand-in for a hub model)."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(family, seed=seed, vocab_size=len(tokenizer))
    folder = tmp_path / f"tiny-{family}"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_dlm_folders(root, base, blocks=(1, 4), sharpen: float = 50.0) -> dict:
    """Save one dLM of `base` per block size as `root/dlm<B>`; returns {"dlm<B>": path}.

    Block sizes above 1 get their final-norm gain multiplied by `sharpen`: a random model's logits are nearly flat,
    and sharpened ones have no greedy near-ties and let thresholds commit several tokens a forward."""
    from ar2dlm.model.dlm import BlockDiffusionLM
    from ar2dlm.model.loading import load_base

    out = {}
    for block in blocks:
        model, tok = load_base(str(base))
        if block > 1:
            with torch.no_grad():
                model.model.norm.weight.mul_(sharpen)
        out[f"dlm{block}"] = root / f"dlm{block}"
        BlockDiffusionLM.from_base(model, tok, block_size=block, base_model=str(base)).save_pretrained(
            out[f"dlm{block}"], tok)
    return out


QA_ANSWERS = ["The sky is blue on a clear day.", "Two plus two is four.", "0 1 2 3 4 5 6 7 8 9",
              "The quick brown fox jumps over the lazy dog."]


def qa_records(n: int = 40) -> list[dict]:
    """Question/answer records with a few repeated answers: a drafter can learn them in a few dozen steps."""
    return [{"question": f"Question {i % 5}?", "answer": QA_ANSWERS[i % len(QA_ANSWERS)]} for i in range(n)]


def write_jsonl(path, records):
    """Write records as JSON lines; a string is written as the line itself (for blank or malformed lines)."""
    import json

    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def masked_text(tokenizer, example, maskable: bool = True) -> str:
    """The decoded tokens of an `Example` that are maskable (or, with maskable=False, the ones that are not)."""
    return tokenizer.decode([i for i, m in zip(example.input_ids, example.maskable) if m == maskable])


def record_forwards(runner) -> list[tuple[int, int, int]]:
    """Record every model call of an engine's `ModelRunner` from now on: (rows, fed queries, attention key slots)
    per forward, whichever decoder forward (fused or Hugging Face's) runs it."""
    calls = []
    call = runner.decoder_hidden

    def recording(ids, mask, pos, cache, *capture):
        calls.append((ids.shape[0], ids.shape[1], mask.shape[-1]))
        return call(ids, mask, pos, cache, *capture)

    runner.decoder_hidden = recording
    return calls



def first_two_joint(model, ids: list[int], sampling) -> dict[tuple[int, int], float]:
    """The AR model's joint distribution of its first two sampled tokens after `ids` (under `sampling`)."""
    from ar2dlm.engine.sampling import filtered_probs

    def next_probs(prefix):
        with torch.no_grad():
            return filtered_probs(model(torch.tensor([prefix]))[0][0, -1], sampling)

    first = next_probs(ids)
    return {(a, b): first[a].item() * q.item() for a in first.nonzero()[:, 0].tolist()
            for b, q in enumerate(next_probs(ids + [a])) if q > 0}


def fixed_proposal(joint: dict, vocab: int, never: int = 5) -> torch.Tensor:
    """A draft distribution over every token the AR model may pick second, plus `never` (one it never picks there,
    always rejected): speculative sampling then both accepts and rejects."""
    q = torch.zeros(vocab)
    q[sorted({b for _, b in joint})] = 1.0
    q[never] += 1.0
    return q / q.sum()


def assert_follows_joint(counts, joint: dict, n: int) -> None:
    """Chi-square test (p = 0.001) of `n` sampled pairs against `joint`; no pair outside it."""
    assert set(counts) <= set(joint)
    chi2 = sum((counts[c] - n * p) ** 2 / (n * p) for c, p in joint.items())
    assert chi2 < {8: 26.1, 7: 24.3, 6: 22.5, 5: 20.5, 4: 18.5}[len(joint) - 1]


def sample_pairs(engine, ids: list[int], params: list) -> tuple:
    """Decode `ids` once per DecodeParams in `params` (all queued together): (Counter of the first two tokens,
    drafts offered, drafts accepted) over all of them."""
    from collections import Counter

    rids = [engine.add_request(ids, p) for p in params]
    requests = [engine.requests[rid] for rid in rids]  # finished requests leave the engine's table
    while engine.has_unfinished():
        engine.step()
    counts = Counter(tuple(req.tokens[:2]) for req in requests)
    return counts, sum(r.state.offered_drafts for r in requests), sum(r.state.accepted_drafts for r in requests)
