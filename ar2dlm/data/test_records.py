"""Raw records: JSON lines with errors naming file and line, and recognising chat, instruction and text records."""

import gzip

import pytest

from ar2dlm.data.records import iter_jsonl_file, parse_record, read_text_lines, require_fields
from ar2dlm.data.tokenize import DataConfig, load_examples
from ar2dlm.errors import Ar2dlmError
from ar2dlm.testing import write_jsonl


def test_json_lines_skip_blank_lines_and_read_gzip(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"a": 1}, "", {"a": 2}])
    assert list(iter_jsonl_file(path)) == [(f"{path}:1", {"a": 1}), (f"{path}:3", {"a": 2})]
    gz = tmp_path / "a.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write('{"a": 1}\n')
    assert list(iter_jsonl_file(gz)) == [(f"{gz}:1", {"a": 1})]


def test_unreadable_text_is_one_error_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(Ar2dlmError, match=r"bad\.jsonl: not UTF-8 text") as e:
        list(iter_jsonl_file(bad))
    assert "\n" not in str(e.value)
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"not gzip at all")
    with pytest.raises(Ar2dlmError, match=r"broken\.jsonl\.gz: cannot read"):
        list(iter_jsonl_file(broken))
    with pytest.raises(Ar2dlmError, match="cannot read"):
        read_text_lines(tmp_path)  # a folder


@pytest.mark.parametrize("rec,kind,origin", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "chat", "chat"),
    ({"question": "q", "answer": "a", "system": "be brief"}, "chat", "instruction"),
    ({"text": "plain"}, "text", "text"),
    ({"text": "plain", "question": "q"}, "text", "text"),  # a prompt field without a response stays text
])
def test_record_formats(rec, kind, origin):
    r = parse_record("f:1", rec)
    assert (r.kind, r.origin, r.where) == (kind, origin, "f:1")
    if rec.get("system"):
        assert [m["role"] for m in r.messages] == ["system", "user", "assistant"]


@pytest.mark.parametrize("bad,msg", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"foo": 1}', "unknown record format"),
    ('{"question": "q"}', "has 'question' but none of"),
    ('{"question": 3, "answer": "a"}', "'question' must be a string"),
    ('{"text": ["a"]}', "'text' must be a string"),
    ('{"messages": "hi"}', "non-empty list"),
    ('{"messages": [{"role": "user", "content": 5}]}', "string 'content'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
])
def test_malformed_record_names_file_and_line(tmp_path, tok, bad, msg):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}, "", bad])
    with pytest.raises(Ar2dlmError, match=msg) as e:
        load_examples(DataConfig(str(path)), tok)
    assert str(e.value).startswith(f"{path}:3: ") and "\n" not in str(e.value)


def test_require_fields_names_the_location():
    assert require_fields("f:2", {"a": "x", "b": 1}, {"a": str, "b": (int, str)}) == {"a": "x", "b": 1}
    with pytest.raises(Ar2dlmError, match=r"^f:2: expected a JSON object, got list$"):
        require_fields("f:2", [1], {"a": str})
    with pytest.raises(Ar2dlmError, match=r"^f:2: missing field 'b'$"):
        require_fields("f:2", {"a": "x"}, {"a": str, "b": int})
    with pytest.raises(Ar2dlmError, match=r"^f:2: field 'a' has type int$"):
        require_fields("f:2", {"a": 3}, {"a": str})
