"""Sources: every local file type, hub ids and their defaults, and one clear error line for a bad source."""

import gzip
import json
import os
import subprocess
import sys
import types

import pytest

from ar2dlm.data.records import parse_record
from ar2dlm.data.sources import iter_raw_records, parse_hub_id
from ar2dlm.data.tokenize import DataConfig, load_examples
from ar2dlm.errors import Ar2dlmError
from ar2dlm.testing import masked_text, write_jsonl

EOT = "<|im_end|>"


def test_file_types(tmp_path, tok):
    recs = [{"question": "q one", "answer": "a one"}, {"question": "q two", "answer": "a two"}]
    write_jsonl(tmp_path / "a.jsonl", recs)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "b.json").write_text(json.dumps({"data": recs}))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.jsonl.gz", "a.json", "b.json", "a.parquet"):
        examples = load_examples(DataConfig(str(tmp_path / name)), tok)
        assert [masked_text(tok, e) for e in examples] == ["a one" + EOT, "a two" + EOT], name
    assert [w for w, _ in iter_raw_records(tmp_path / "a.parquet")] == [f"{tmp_path / 'a.parquet'}: row {i}"
                                                                        for i in range(2)]


def test_json_lines_under_a_json_name(tmp_path):
    path = write_jsonl(tmp_path / "a.json", [{"text": "one"}, {"text": "two"}])
    assert list(iter_raw_records(str(path))) == [(f"{path}:1", {"text": "one"}), (f"{path}:2", {"text": "two"})]
    (tmp_path / "two.json").write_text(json.dumps({"a": [], "b": []}))
    with pytest.raises(Ar2dlmError, match="exactly one list"):
        list(iter_raw_records(tmp_path / "two.json"))


def test_txt_paragraphs_are_documents(tmp_path, tok):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n\n\nthird para\n  \nfourth\n")
    recs = [parse_record(w, r) for w, r in iter_raw_records(str(tmp_path / "a.txt"))]
    assert [r.text for r in recs] == ["first line\nsecond line", "third para", "fourth"]
    assert [r.where.rsplit(":", 1)[1] for r in recs] == ["1", "5", "7"]
    assert load_examples(DataConfig(str(tmp_path / "a.txt"), seq_len=8), tok)


def test_non_utf8_file_is_one_error_line(tmp_path):
    for name in ("bad.txt", "bad.json", "bad.jsonl"):
        (tmp_path / name).write_bytes(b'{"text": "\xff"}\n')
        with pytest.raises(Ar2dlmError, match=rf"{name}: not UTF-8 text") as e:
            list(iter_raw_records(tmp_path / name))
        assert "\n" not in str(e.value)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(Ar2dlmError, match=r"bad\.parquet: cannot read parquet"):
        list(iter_raw_records(tmp_path / "bad.parquet"))


def test_malformed_in_json_array_and_parquet(tmp_path, tok):
    (tmp_path / "a.json").write_text(json.dumps([{"question": "q", "answer": "a"}, {"foo": 1}]))
    with pytest.raises(Ar2dlmError, match=r"a\.json: item 1: unknown record format"):
        load_examples(DataConfig(str(tmp_path / "a.json")), tok)
    import pyarrow as pa
    import pyarrow.parquet as pq

    # a parquet table has one schema: a field missing from a row reads as None
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "a"}, {"question": "q"}]), tmp_path / "a.parquet")
    with pytest.raises(Ar2dlmError, match=r"a\.parquet: row 1: field 'answer' must be a string, got NoneType"):
        load_examples(DataConfig(str(tmp_path / "a.parquet")), tok)


def test_missing_empty_and_unknown_sources(tmp_path, tok):
    with pytest.raises(Ar2dlmError, match="not found"):
        load_examples(DataConfig(str(tmp_path / "nope.jsonl")), tok)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(Ar2dlmError, match="unsupported file type"):
        load_examples(DataConfig(str(tmp_path / "x.csv")), tok)
    with pytest.raises(Ar2dlmError, match="neither a file"):
        load_examples(DataConfig("not a dataset!"), tok)
    with pytest.raises(Ar2dlmError, match="is a folder"):
        iter_raw_records(tmp_path)


def test_bad_sources(tmp_path):
    with pytest.raises(Ar2dlmError, match="not found"):
        iter_raw_records(str(tmp_path / "missing.jsonl"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(Ar2dlmError, match="unsupported"):
        iter_raw_records(str(tmp_path / "data.csv"))
    with pytest.raises(Ar2dlmError):
        iter_raw_records("  ")


# ---------------------------------------------------------------------------------------------------- hub


def test_hub_id_parsing():
    assert parse_hub_id("openai/gsm8k:main@train") == ("openai/gsm8k", "main", "train")
    assert parse_hub_id("openai/gsm8k") == ("openai/gsm8k", None, "train")
    assert parse_hub_id("user/ds@test[:100]") == ("user/ds", None, "test[:100]")


def test_parse_hub_id_defaults():
    default = ("openai/gsm8k", "main", "test")
    assert parse_hub_id("openai/gsm8k", default) == ("openai/gsm8k", "main", "test")
    assert parse_hub_id("openai/gsm8k@train", default) == ("openai/gsm8k", "main", "train")
    assert parse_hub_id("someone/gsm8k-copy", default) == ("someone/gsm8k-copy", None, "test")
    assert parse_hub_id("a/b:cfg@validation", default) == ("a/b", "cfg", "validation")


def test_hub_loading_and_errors_are_wrapped(monkeypatch, tok):
    import datasets

    calls = []

    def fake_load(name, config, split):
        calls.append((name, config, split))
        return [{"question": "q", "answer": "a"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    (ex,) = load_examples(DataConfig("openai/gsm8k:main@test"), tok)
    assert calls == [("openai/gsm8k", "main", "test")] and masked_text(tok, ex) == "a" + EOT
    assert [w for w, _ in iter_raw_records("openai/gsm8k:main@test")] == ["openai/gsm8k:main@test: row 0"]

    def failing_load(*a, **k):
        raise ConnectionError("Couldn't reach 'x/y' on the Hub\nlong traceback text")

    monkeypatch.setattr(datasets, "load_dataset", failing_load)
    with pytest.raises(Ar2dlmError, match="could not load dataset 'x/y'") as e:
        load_examples(DataConfig("x/y"), tok)
    assert "\n" not in str(e.value)


def test_hub_failure_is_one_line_error(monkeypatch):
    def load_dataset(name, config, split):
        raise ConnectionError("Couldn't reach the hub\nmore details")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(Ar2dlmError) as e:
        list(iter_raw_records("openai/gsm8k@test", ("openai/gsm8k", "main", "test")))
    assert "\n" not in str(e.value) and "ConnectionError" in str(e.value) and "openai/gsm8k" in str(e.value)


def test_hub_without_datasets_package_is_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(Ar2dlmError, match="needs the `datasets` package"):
        list(iter_raw_records("a/b"))


def test_hub_offline_fails_fast_with_one_line_error(tmp_path):
    code = ("from ar2dlm.data.sources import iter_raw_records\nfrom ar2dlm.errors import Ar2dlmError\n"
            "try:\n    list(iter_raw_records('no-such-user/no-such-dataset'))\n"
            "except Ar2dlmError as e:\n    print('ERR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    lines = [line for line in out.stdout.splitlines() if line.startswith("ERR ")]
    assert len(lines) == 1 and "could not load dataset" in lines[0], out.stdout + out.stderr
