"""The pieces of an evaluation point: the resumable store of finished samples."""

from ar2dlm.evaluation.points import PartialStore


def test_partial_store_survives_a_torn_line(tmp_path):
    path = tmp_path / "p.jsonl"
    PartialStore(path).add([{"point": "a", "id": "s0", "prompt_sha": "x", "text": "t"}])
    with open(path, "a") as f:
        f.write('{"point": "a", "id": "s1", "pro')
    store = PartialStore(path)
    store.add([{"point": "a", "id": "s2", "prompt_sha": "y", "text": "u"}])
    assert sorted(k[1] for k in PartialStore(path).records) == ["s0", "s2"]
