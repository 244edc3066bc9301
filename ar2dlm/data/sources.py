"""Where raw records come from: a local data file or a Hugging Face hub dataset, for training and evaluation alike.

Local files, by suffix:
  * `.jsonl`, `.jsonl.gz`: one JSON record per line (blank lines skipped);
  * `.json`: a list of records, an object holding exactly one list of records, or JSON lines under a .json name;
  * `.parquet`: one record per row;
  * `.txt`: plain text; documents are separated by one or more blank lines, each becomes `{"text": ...}`.

Hub datasets: `name[:config][@split]`, e.g. `openai/gsm8k:main@train`, loaded with `datasets.load_dataset`
(imported only then, so nothing needs the network otherwise). Missing parts come from the caller's defaults: the
split always, the config only when `name` is the default dataset itself (a task's own data set).

Every record comes with its location for error messages: `path:line` for JSON lines and text, `path: item i` for
a JSON list, `path: row i` for parquet, `name[:config]@split: row i` for the hub. An unreadable, non-UTF-8 or
malformed file, a missing file and an unreachable dataset are each one `Ar2dlmError` line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from ar2dlm.data.records import first_line, iter_jsonl, iter_jsonl_file, read_text_lines
from ar2dlm.errors import Ar2dlmError

RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")  # files of structured records
LOCAL_SUFFIXES = RECORD_SUFFIXES + (".txt",)
HubDefaults = tuple[str, str | None, str]  # (dataset name, config, split)
TRAIN_SPLIT = ("", None, "train")  # no default dataset: take the train split of whatever is named
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?(@[\w.\[\]:%+-]+)?$")

Located = tuple[str, object]  # (location, raw record)


# ----------------------------------------------------------------------------------------------- local files
def _iter_json(path: Path) -> Iterator[Located]:
    lines = read_text_lines(path)
    try:
        obj = json.loads("\n".join(lines))
    except json.JSONDecodeError:
        yield from iter_jsonl(path, lines)  # JSON lines under a .json name; errors name the line
        return
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise Ar2dlmError(f"{path}: expected a JSON list of records (or an object holding exactly one list)")
        obj = lists[0]
    if not isinstance(obj, list):
        raise Ar2dlmError(f"{path}: expected a JSON list of records, got {type(obj).__name__}")
    for i, rec in enumerate(obj):
        yield f"{path}: item {i}", rec


def _iter_parquet(path: Path) -> Iterator[Located]:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise Ar2dlmError(f"{path}: cannot read parquet ({first_line(e)})") from None
    row = 0
    for batch in table.to_batches():
        for rec in batch.to_pylist():
            yield f"{path}: row {row}", rec
            row += 1


def _iter_txt(path: Path) -> Iterator[Located]:
    """One `{"text": ...}` per paragraph; the location is the paragraph's first line."""
    para: list[str] = []
    start = 0
    for i, line in enumerate([*read_text_lines(path), ""], 1):
        if line.strip():
            if not para:
                start = i
            para.append(line)
        elif para:
            yield f"{path}:{start}", {"text": "\n".join(para)}
            para = []


_READERS: tuple[tuple[str, Callable[[Path], Iterator[Located]]], ...] = (
    (".jsonl.gz", iter_jsonl_file), (".jsonl", iter_jsonl_file), (".json", _iter_json),
    (".parquet", _iter_parquet), (".txt", _iter_txt),
)


def iter_local_file(path: Path) -> Iterator[Located]:
    """The records of a local data file, read by its suffix (checked now, read as the caller iterates)."""
    if not path.exists():
        raise Ar2dlmError(f"{path}: data file not found")
    if path.is_dir():
        raise Ar2dlmError(f"{path}: is a folder; give a data file ({', '.join(LOCAL_SUFFIXES)})")
    name = path.name.lower()
    for suffix, reader in _READERS:
        if name.endswith(suffix):
            return reader(path)
    raise Ar2dlmError(f"{path}: unsupported file type (use one of {', '.join(LOCAL_SUFFIXES)})")


def looks_local(source: str) -> bool:
    """Whether `source` names a file (existing, or by its suffix or path prefix) rather than a hub dataset."""
    low = source.lower()
    return (Path(source).expanduser().exists() or low.endswith(LOCAL_SUFFIXES + (".gz",))
            or source.startswith(("/", "./", "../", "~", "\\")))


# ----------------------------------------------------------------------------------------------- hub
def parse_hub_id(source: str, defaults: HubDefaults = TRAIN_SPLIT) -> tuple[str, str | None, str]:
    """`name[:config][@split]` -> (name, config, split); the split from `defaults` when missing, the config too
    when `name` is the default dataset (another dataset's configs are unknown, so None)."""
    rest, _, split = source.partition("@")
    name, _, config = rest.partition(":")
    if not name:
        raise Ar2dlmError(f"dataset source {source!r}: missing dataset name")
    same = name == defaults[0]
    return name, (config or (defaults[1] if same else None)), (split or defaults[2])


def _iter_hub(source: str, defaults: HubDefaults) -> Iterator[Located]:
    name, config, split = parse_hub_id(source, defaults)
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except ImportError as e:
        raise Ar2dlmError(f"loading hub dataset {source!r} needs the `datasets` package ({first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - offline, unknown id, bad config/split: one user-facing line
        raise Ar2dlmError(f"could not load dataset {name!r} (config {config!r}, split {split!r}) from the Hugging "
                          f"Face hub: {type(e).__name__}: {first_line(e)}") from None
    label = name + (f":{config}" if config else "") + f"@{split}"
    for i, rec in enumerate(ds):
        yield f"{label}: row {i}", rec


# ----------------------------------------------------------------------------------------------- either
def iter_raw_records(source: str | Path, hub_defaults: HubDefaults = TRAIN_SPLIT) -> Iterator[Located]:
    """(location, raw record) pairs from a local file (a `Path` always is one) or a hub dataset id.

    The source is checked when called; records are read as the caller iterates (`close()` stops early)."""
    text = str(source).strip()
    if not text:
        raise Ar2dlmError("no data source given")
    if isinstance(source, Path) or looks_local(text):
        return iter_local_file(Path(text).expanduser())
    if _HUB_ID.match(text):
        return _iter_hub(text, hub_defaults)
    raise Ar2dlmError(f"data source {text!r} is neither a file ({', '.join(LOCAL_SUFFIXES)}) "
                      "nor a hub dataset id (name[:config][@split])")
