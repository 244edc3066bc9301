"""The lm_eval model `ar2dlm` end to end: local YAML tasks over local jsonl files, tiny random dLMs, no network."""

from __future__ import annotations

import json
import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from ar2dlm.engine import DecodeParams, Engine  # noqa: E402
from ar2dlm.evaluation.fidelity import completion_nll  # noqa: E402
from ar2dlm.evaluation.lm_eval_adapter import Ar2dlmLM  # noqa: E402
from ar2dlm.model.loading import load_base  # noqa: E402
from ar2dlm.testing import tiny_base, tiny_dlm_folders  # noqa: E402

GEN = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(3)]
MC = [{"question": f"the quick brown {w}", "choices": [" fox", " dog", " cat"], "label": 0} for w in ("fox", "dog")]
ROLL = [{"text": "the quick brown fox jumps over the lazy dog"}, {"text": "def add(a, b):\n    return a + b"}]


def _task(name: str, data, cache, body: str) -> str:
    # dataset_path json + data_files: the datasets library reads the local file, nothing goes to the hub
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"  cache_dir: {cache}\ntest_split: test\n{body}")


def write_tasks(root) -> dict:
    """A tiny AR parent, its dLMs (blocks 1 and 4), and local YAML tasks (generation, choice, rolling) over jsonl."""
    base = tiny_base(root)
    dlms = tiny_dlm_folders(root, base)
    tasks, cache = root / "tasks", root / "hf-datasets"
    tasks.mkdir()
    for name, rows in (("gen", GEN), ("mc", MC), ("roll", ROLL)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tasks / "gen.yaml").write_text(_task("tiny_gen", root / "gen.jsonl", cache, (
        'output_type: generate_until\ndoc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n", "Q:", "ss"]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n")))
    (tasks / "mc.yaml").write_text(_task("tiny_mc", root / "mc.jsonl", cache, (
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n')))
    (tasks / "roll.yaml").write_text(_task("tiny_roll", root / "roll.jsonl", cache, (
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")))
    return {"root": root, "base": base, **dlms, "tasks": tasks}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("lm_eval"))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def made(monkeypatch):
    """The Ar2dlmLM objects lm_eval builds from the name "ar2dlm" (to see what they were asked)."""
    objs, init = [], Ar2dlmLM.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        objs.append(self)

    monkeypatch.setattr(Ar2dlmLM, "__init__", spy)
    return objs


def test_simple_evaluate_runs_generation_choice_and_rolling_tasks(files, made):
    tm = TaskManager(include_path=str(files["tasks"]), include_defaults=False)
    out = lm_eval.simple_evaluate(
        model="ar2dlm", model_args=f"pretrained={files['dlm4']},policy=threshold,tau=0.9,samples=2",
        tasks=["tiny_gen", "tiny_mc", "tiny_roll"], task_manager=tm, batch_size=2, log_samples=True)
    res = out["results"]
    assert res["tiny_gen"]["sample_len"] == 3 and 0.0 <= res["tiny_gen"]["exact_match,none"] <= 1.0
    assert res["tiny_mc"]["sample_len"] == 2 and res["tiny_mc"]["acc,none"] in (0.0, 0.5, 1.0)
    assert res["tiny_roll"]["word_perplexity,none"] > 1.0 and res["tiny_roll"]["bits_per_byte,none"] > 0
    (lm,) = made
    assert lm.batch_size == 2 and lm.samples == 2 and lm.dlm.config.block_size == 4
    assert lm.request_counts == {"generate_until": 3, "loglikelihood": 6, "loglikelihood_rolling": 2}

    # generations are exactly what the engine decodes for the prompt with the task's stop strings and budget
    engine = Engine(lm.dlm, lm.tokenizer)
    dcfg = DecodeParams(max_new_tokens=6, policy="threshold", tau=0.9, stop_strings=("\n", "Q:", "ss"))
    cut = 0
    for s in out["samples"]["tiny_gen"]:
        prompt = s["arguments"][0][0]
        assert prompt == f"Q: {GEN[s['doc_id']]['question']}\nA:"
        ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert s["resps"][0][0] == engine.generate(ids, dcfg).text
        cut += s["resps"][0][0] != engine.generate(ids, dcfg, stop_strings=()).text
    assert cut >= 1  # the task's `until` really stopped a generation (this tiny model writes "...ss" once)
    for s in out["samples"]["tiny_mc"]:
        scores = [r[0] for r in s["resps"]]
        assert len(scores) == 3 and all(math.isfinite(ll) and ll < 0 and isinstance(g, bool) for ll, g in scores)


def _ll(ctx: str, cont: str) -> Instance:
    return Instance("loglikelihood", {}, (ctx, cont), 0)


def test_block_size_1_gives_the_exact_ar_loglikelihood(files):
    # a block-size-1 dLM's bound is exact: it must equal the AR parent's log-probability, computed by HF directly
    lm = Ar2dlmLM(pretrained=str(files["dlm1"]), samples=2, batch_size=3)
    parent, tok = load_base(str(files["base"]))
    pairs = [("the quick brown", " fox jumps"), ("def add(a, b):", "\n    return a + b"), ("", "the lazy dog")]
    got = lm.loglikelihood([_ll(c, x) for c, x in pairs])
    for (ctx, cont), (ll, _) in zip(pairs, got):
        ctx_ids, cont_ids = lm._encode_pair(ctx, cont) if ctx else ([lm.prefix_token_id], lm.tok_encode(cont))
        assert ll == pytest.approx(-completion_nll(parent, ctx_ids, cont_ids).total, rel=1e-5)

    # is_greedy: true for the parent's own greedy continuation, false once a token is changed
    ctx = tok("the quick brown fox")["input_ids"]
    greedy = []
    with torch.no_grad():
        for _ in range(5):
            greedy.append(int(parent(torch.tensor([ctx + greedy])).logits[0, -1].argmax()))
    (ll_g, is_g), (_, is_w) = lm._loglikelihood_tokens([(None, ctx, greedy), (None, ctx, greedy[:-1] + [7])])
    assert is_g and not is_w and ll_g == pytest.approx(-completion_nll(parent, ctx, greedy).total, rel=1e-5)

    # rolling: with a 6-token window the text is scored in windows, each given the tokens before it
    short = Ar2dlmLM(pretrained=str(files["dlm1"]), max_length=6)
    text = ROLL[0]["text"]
    (total,) = short.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    windows = map(make_disjoint_window, get_rolling_token_windows(
        tok(text, add_special_tokens=False)["input_ids"], short.prefix_token_id, 5, 1))
    want = sum(completion_nll(parent, c, p).total for c, p in windows)
    assert total == pytest.approx(-want, rel=1e-5)


def test_loglikelihood_is_seeded_by_content(files):
    lm = Ar2dlmLM(pretrained=str(files["dlm4"]), samples=2, batch_size=2)
    reqs = [_ll("the quick brown", " fox"), _ll("0 1 2 3", " 4 5 6 7 8"), _ll("def add(a, b):", " return")]
    first = lm.loglikelihood(reqs)
    assert lm.loglikelihood(list(reversed(reqs))) == list(reversed(first))  # order and batching do not matter
    assert Ar2dlmLM(pretrained=str(files["dlm4"]), samples=2, seed=1).loglikelihood(reqs) != first


def test_model_args_take_every_decoding_setting(files):
    lm = Ar2dlmLM(pretrained=str(files["dlm4"]), policy="entropy", tau="0.4", block_parallel=True,
                  activate_ratio=0.8, max_open_blocks="2", p_add=0.2, seed=3, stop_strings="END")
    assert lm._decode == DecodeParams(policy="entropy", tau=0.4, block_parallel=True, activate_ratio=0.8,
                                      max_open_blocks=2, p_add=0.2, seed=3, stop_strings=("END",))
    assert lm.seed == 3  # the bound's draws share the seed
    greedy = lm._decode_config({"until": ["\n"], "max_gen_toks": 5})
    assert greedy.max_new_tokens == 5 and greedy.stop_strings == ("END", "\n") and greedy.temperature == 0.0
    assert greedy.max_open_blocks == 2 and greedy.activate_ratio == 0.8
    sampled = lm._decode_config({"do_sample": True, "top_k": 4})
    assert sampled.temperature == 1.0 and sampled.top_k == 4
