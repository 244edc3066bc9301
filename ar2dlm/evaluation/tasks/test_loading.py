import gzip
import json
import sys
import types

import pytest

from ar2dlm.errors import Ar2dlmError
from ar2dlm.evaluation.tasks import GSM8K, TASKS, HumanEval, get_task
from ar2dlm.evaluation.tasks.base import parse_hub_source

GSM = {"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}


def _write_jsonl(path, records, raw_lines=()):
    lines = [json.dumps(r) for r in records] + list(raw_lines)
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    else:
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_load_local_file_with_limit(tmp_path, suffix):
    path = _write_jsonl(tmp_path / f"g{suffix}", [GSM, {**GSM, "question": "Q2"}, {**GSM, "question": "Q3"}])
    samples = GSM8K().load(source=str(path))
    assert [s.prompt for s in samples] == ["What is 2 + 3?", "Q2", "Q3"]
    assert samples[0].id == "gsm8k/0" and samples[0].reference == "5"
    assert len(GSM8K().load(limit=2, source=path)) == 2


def test_blank_lines_are_skipped_and_malformed_lines_name_file_and_line(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps(GSM) + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(Ar2dlmError, match=r"g\.jsonl:3: invalid JSON"):
        GSM8K().load(source=str(path))
    _write_jsonl(path, [GSM, {"question": "no answer"}])
    with pytest.raises(Ar2dlmError, match=r"g\.jsonl:2: missing field 'answer'"):
        GSM8K().load(source=str(path))
    _write_jsonl(path, [{"question": "q", "answer": "no final line"}])
    with pytest.raises(Ar2dlmError, match=r"g\.jsonl:1: .*####"):
        GSM8K().load(source=str(path))
    _write_jsonl(path, [[1, 2]])
    with pytest.raises(Ar2dlmError, match=r"g\.jsonl:1: expected a JSON object"):
        GSM8K().load(source=str(path))
    _write_jsonl(path, [{"task_id": "x", "prompt": 3, "canonical_solution": "", "test": "", "entry_point": "f"}])
    with pytest.raises(Ar2dlmError, match=r"g\.jsonl:1: field 'prompt' has type int"):
        HumanEval().load(source=str(path))


def test_bad_sources(tmp_path):
    with pytest.raises(Ar2dlmError, match="not found"):
        GSM8K().load(source=str(tmp_path / "missing.jsonl"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(Ar2dlmError, match="unsupported"):
        GSM8K().load(source=str(tmp_path / "data.csv"))
    with pytest.raises(Ar2dlmError, match="limit"):
        GSM8K().load(limit=0, source=str(tmp_path / "x.jsonl"))
    with pytest.raises(Ar2dlmError):
        GSM8K().load(source="  ")


def test_parse_hub_source_defaults():
    default = ("openai/gsm8k", "main", "test")
    assert parse_hub_source("openai/gsm8k", default) == ("openai/gsm8k", "main", "test")
    assert parse_hub_source("openai/gsm8k@train", default) == ("openai/gsm8k", "main", "train")
    assert parse_hub_source("someone/gsm8k-copy", default) == ("someone/gsm8k-copy", None, "test")
    assert parse_hub_source("a/b:cfg@validation", default) == ("a/b", "cfg", "validation")


def test_hub_loading_goes_through_datasets_lazily(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return [GSM, {**GSM, "question": "Q2"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    samples = GSM8K().load(limit=1)
    assert calls == [("openai/gsm8k", "main", "test")] and len(samples) == 1


def test_hub_failure_is_one_line_error(monkeypatch):
    def load_dataset(name, config, split):
        raise ConnectionError("Couldn't reach the hub\nmore details")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(Ar2dlmError) as e:
        GSM8K().load(source="openai/gsm8k@test")
    assert "\n" not in str(e.value) and "ConnectionError" in str(e.value) and "openai/gsm8k" in str(e.value)


def test_registry():
    assert set(TASKS) == {"gsm8k", "humaneval", "mbpp"}
    assert isinstance(get_task(" GSM8K "), GSM8K)
    assert get_task("mbpp", timeout_s=3).timeout_s == 3
    with pytest.raises(Ar2dlmError, match="unknown task"):
        get_task("mmlu")
    with pytest.raises(Ar2dlmError, match="bad option"):
        get_task("humaneval", fewshot_source="x")
