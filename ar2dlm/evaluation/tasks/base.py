"""The task interface shared by every benchmark.

A task turns raw records into `Sample`s (`load`), a sample into the text the model continues (`build_prompt`), and the
model's continuation into a verdict (`score`, a dict with at least `correct: bool`).

Records come from `ar2dlm.data.sources`: a local file (`.jsonl`, `.jsonl.gz`, `.json`, `.parquet`) or a hub dataset
id `name[:config][@split]`. A hub id without config or split takes the task's defaults when `name` is the task's own
dataset. A malformed record is an `Ar2dlmError` naming `file:line` (or the dataset row).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from ar2dlm.data.sources import iter_raw_records
from ar2dlm.errors import Ar2dlmError


@dataclass(frozen=True)
class Sample:
    id: str
    prompt: str  # the task's own prompt material: a question, a function header, a problem statement
    reference: str  # the gold answer or solution
    data: dict = field(default_factory=dict, compare=False)  # task-specific fields (tests, entry point, ...)


class Task(ABC):
    """A benchmark: where its data lives, how to prompt for a sample, how to score a completion."""

    name: str = ""
    default_hub: tuple[str, str | None, str] = ("", None, "test")  # (dataset, config, split) on the hub
    fewshot_hub: tuple[str, str | None, str] | None = None  # where few-shot examples come from by default

    def __init__(self, fewshot_source: str | Path | None = None):
        # Few-shot examples: the first k records of this source (by default the task's own train/prompt split).
        self.fewshot_source = fewshot_source
        self._fewshot_cache: list[Sample] | None = None
        self._fewshot_more = True  # whether the source may hold more records than the cache

    # -- data -----------------------------------------------------------------------------------------------------
    @abstractmethod
    def parse_record(self, where: str, index: int, rec: object) -> Sample:
        """One raw record -> a Sample; a malformed record raises Ar2dlmError naming `where`."""

    def load(self, limit: int | None = None, source: str | Path | None = None) -> list[Sample]:
        """The first `limit` samples (all when None) of `source` (default: the task's hub dataset)."""
        if limit is not None and limit <= 0:
            raise Ar2dlmError(f"{self.name}: limit must be positive, got {limit}")
        default = self.default_hub
        src = source if source is not None else ":".join(p for p in default[:2] if p) + f"@{default[2]}"
        return self._read(src, default, limit)

    def _read(self, src, default, limit) -> list[Sample]:
        samples: list[Sample] = []
        records = iter_raw_records(src, default)
        try:
            for i, (where, rec) in enumerate(records):
                if limit is not None and len(samples) >= limit:
                    break
                samples.append(self.parse_record(where, i, rec))
        finally:
            records.close()  # closes the file now when we stop early
        return samples

    def fewshot_examples(self, k: int, exclude: Sample | None = None) -> list[Sample]:
        """The first k few-shot records, skipping one that is the sample being asked (same prompt)."""
        if k < 0:
            raise Ar2dlmError(f"{self.name}: fewshot must be >= 0, got {k}")
        if k == 0:
            return []
        if self.fewshot_source is None and self.fewshot_hub is None:
            raise Ar2dlmError(f"{self.name}: few-shot prompting is not supported (use fewshot=0)")
        need = k + 1
        if self._fewshot_cache is None or (len(self._fewshot_cache) < need and self._fewshot_more):
            default = self.fewshot_hub or self.default_hub
            src = self.fewshot_source
            if src is None:
                src = ":".join(p for p in default[:2] if p) + f"@{default[2]}"
            self._fewshot_cache = self._read(src, default, need)
            self._fewshot_more = len(self._fewshot_cache) >= need
        shots = [s for s in self._fewshot_cache if exclude is None or s.prompt != exclude.prompt][:k]
        if len(shots) < k:
            raise Ar2dlmError(f"{self.name}: asked for {k} few-shot examples, the few-shot source has {len(shots)}")
        return shots

    # -- prompting and scoring ------------------------------------------------------------------------------------
    @abstractmethod
    def build_prompt(self, sample: Sample, tokenizer=None, chat: bool = True, fewshot: int = 0) -> str:
        """The text the model continues (rendered with the tokenizer's chat template when `chat`)."""

    def stop_sequences(self, chat: bool = True) -> tuple[str, ...]:
        """Strings at which a generator may stop early; `score` cuts at them too, so stopping is optional."""
        return ()

    @abstractmethod
    def score(self, sample: Sample, completion: str) -> dict:
        """Verdict on the model's continuation of `build_prompt(sample)`: at least {'correct': bool}."""
