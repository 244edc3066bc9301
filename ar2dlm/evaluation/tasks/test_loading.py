import gzip
import json
import sys
import types

import pytest

from ar2dlm.errors import Ar2dlmError
from ar2dlm.evaluation.tasks import GSM8K, TASKS, HumanEval, get_task

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


def test_limit_must_be_positive(tmp_path):
    # (the bad-source errors themselves are tested with the reader, in ar2dlm/data/test_sources.py)
    with pytest.raises(Ar2dlmError, match="limit"):
        GSM8K().load(limit=0, source=str(tmp_path / "x.jsonl"))


def test_tasks_read_every_record_file_type(tmp_path):
    (tmp_path / "g.json").write_text(json.dumps([GSM, {**GSM, "question": "Q2"}]), encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([GSM]), tmp_path / "g.parquet")
    assert [s.prompt for s in GSM8K().load(source=str(tmp_path / "g.json"))] == ["What is 2 + 3?", "Q2"]
    (sample,) = GSM8K().load(source=tmp_path / "g.parquet")
    assert sample.reference == "5"
    pq.write_table(pa.Table.from_pylist([{"question": "q"}]), tmp_path / "bad.parquet")
    with pytest.raises(Ar2dlmError, match=r"bad\.parquet: row 0: missing field 'answer'"):
        GSM8K().load(source=tmp_path / "bad.parquet")


def test_hub_loading_goes_through_datasets_lazily(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return [GSM, {**GSM, "question": "Q2"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    samples = GSM8K().load(limit=1)
    assert calls == [("openai/gsm8k", "main", "test")] and len(samples) == 1


def test_registry():
    assert set(TASKS) == {"gsm8k", "humaneval", "mbpp"}
    assert isinstance(get_task(" GSM8K "), GSM8K)
    assert get_task("mbpp", timeout_s=3).timeout_s == 3
    with pytest.raises(Ar2dlmError, match="unknown task"):
        get_task("mmlu")
    with pytest.raises(Ar2dlmError, match="bad option"):
        get_task("humaneval", fewshot_source="x")
