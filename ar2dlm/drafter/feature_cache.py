"""The parent's features for a training corpus, computed once and kept on disk for every epoch and run.

A feature drafter learns from the frozen parent's hidden states (drafter/feature.py); the parent never changes, so
its features for a corpus are computed once (one no-gradient forward per sequence) and read back by every epoch of
every run that trains on the same examples. A cache is a folder:

    manifest.json                   what it holds: the parent, its feature layers, the chunk size, the last build's
                                    chunks
    chunk-<digest>.safetensors ...  `chunk_size` consecutive examples each, named by their digest (token ids and
                                    maskable flags): their token ids, maskable flags and offsets, and the features
                                    [tokens, F] in float16 (half the bytes; training reads them as float32)

Chunks are found by their examples, not their place: a corpus that grows (new records appended to the data file)
reuses every chunk whose examples are unchanged and writes only the rest. Writing is chunked and resumable: each
chunk is written to a temporary name and renamed into place, with its digest and counts in its own metadata, so a
chunk that was cut off (a killed run, a full disk) is never taken for a finished one: it is found by its name, by
failing to open, or by contents that disagree with its examples, and is written again. A cache made for another
parent, another layer set or another chunk size is refused with what differs. The size on disk is printed before
the first chunk is written; a progress bar shows the chunks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ar2dlm.errors import Ar2dlmError
from ar2dlm.utils.files import write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 2  # 2: chunks named by their examples' digest


def examples_digest(examples) -> str:
    """A fingerprint of the tokenised examples (ids and maskable flags, in order)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(np.asarray(ex.input_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(ex.maskable, dtype=np.bool_).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def chunk_path(folder: Path, digest: str) -> Path:
    return folder / f"chunk-{digest}.safetensors"


@dataclass
class CachedChunk:
    ids: torch.Tensor  # [T] int64, the chunk's examples back to back
    maskable: torch.Tensor  # [T] bool
    offsets: torch.Tensor  # [n + 1] int64: example i is [offsets[i], offsets[i + 1])
    features: torch.Tensor | None  # [T, F] float16 (None when checked without them)


def _read_chunk(path: Path, examples: list, digest: str, feature_dim: int,
                features: bool = True) -> CachedChunk | None:
    """The chunk at `path` if it holds exactly `examples` (and their features), or None when it is missing or
    damaged (cut off, unreadable, or not what it says). `features` False checks the chunk without reading its
    features (their shape, and their last row, which a cut-off file lacks) and returns it with `features` None."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in ("ids", "maskable", "offsets")}
            stored = f.get_slice("features")
            shape = tuple(stored.get_shape())
            tensors["features"] = f.get_tensor("features") if features else None
            if not features and shape[0]:
                stored[shape[0] - 1:]  # reads the file's last bytes: fails on a chunk cut off mid-write
    except Exception:  # noqa: BLE001 - any failure to read means: write it again
        return None
    chunk = CachedChunk(tensors["ids"].long(), tensors["maskable"].bool(), tensors["offsets"].long(),
                        tensors["features"])
    tokens = sum(len(e) for e in examples)
    fine = (meta.get("digest") == digest and meta.get("examples") == str(len(examples))
            and meta.get("tokens") == str(tokens) and chunk.ids.shape == (tokens,)
            and shape == (tokens, feature_dim) and chunk.offsets.shape == (len(examples) + 1,)
            and int(chunk.offsets[-1]) == tokens
            and chunk.ids.tolist() == [t for e in examples for t in e.input_ids])
    return chunk if fine else None


class FeatureCache:
    """A folder of the parent's features for a list of examples (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, parent: str, feature_layers: list[int], feature_dim: int,
                 examples, chunk_size: int = 64):
        self.folder = Path(folder)
        self.examples = list(examples)
        self.chunk_size = chunk_size
        self.digests = [examples_digest(self._chunk_examples(i)) for i in range(self.n_chunks)]
        self.manifest = {"format": FORMAT, "parent": parent, "feature_layers": list(feature_layers),
                         "feature_dim": feature_dim, "dtype": "float16", "chunk_size": chunk_size,
                         "examples": len(self.examples), "tokens": sum(len(e) for e in self.examples),
                         "chunks": self.digests}
        self._check_manifest()

    @property
    def n_chunks(self) -> int:
        return (len(self.examples) + self.chunk_size - 1) // self.chunk_size

    def _chunk_examples(self, index: int) -> list:
        return self.examples[index * self.chunk_size:(index + 1) * self.chunk_size]

    def _check_manifest(self) -> None:
        path = self.folder / MANIFEST
        if not path.is_file():
            return
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise Ar2dlmError(f"feature cache {self.folder}: unreadable {MANIFEST} ({e}); remove the folder") from None
        what = {"format": "format", "parent": "parent", "feature_layers": "feature layers",
                "feature_dim": "feature size", "chunk_size": "chunk size"}
        for key, name in what.items():
            if saved.get(key) != self.manifest[key]:
                raise Ar2dlmError(f"feature cache {self.folder} was written for {name} {saved.get(key)!r}, this run "
                                  f"needs {self.manifest[key]!r}: use another --feature-cache folder (or remove it)")

    def size_bytes(self, chunks: list[int] | None = None) -> int:
        """Bytes on disk of these chunks (default: all of this corpus)."""
        chunks = range(self.n_chunks) if chunks is None else chunks
        tokens = sum(len(e) for i in chunks for e in self._chunk_examples(i))
        return tokens * (self.manifest["feature_dim"] * 2 + 9)

    def missing_chunks(self) -> list[int]:
        """Chunks to write: missing or damaged (checked without reading their features)."""
        return [i for i in range(self.n_chunks) if self.load_chunk(i, features=False) is None]

    def load_chunk(self, index: int, features: bool = True) -> CachedChunk | None:
        return _read_chunk(chunk_path(self.folder, self.digests[index]), self._chunk_examples(index),
                           self.digests[index], self.manifest["feature_dim"], features)

    def other_chunks(self) -> list[Path]:
        """Chunks in the folder that this corpus does not use (written for other examples)."""
        mine = {chunk_path(self.folder, d).name for d in self.digests}
        return sorted(p for p in self.folder.glob("chunk-*.safetensors") if p.name not in mine)

    def build(self, features_of, batch_size: int = 8) -> None:
        """Write every missing or damaged chunk; `features_of(ids [N, L], attention_mask [N, L])` gives the
        parent's features [N, L, F] (right padding)."""
        from safetensors.torch import save_file
        from tqdm.auto import tqdm

        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob("*.tmp"):
            stale.unlink()  # a chunk cut off mid-write: never read, written again below
        write_json(self.folder / MANIFEST, self.manifest)
        todo = self.missing_chunks()
        others = self.other_chunks()
        if others:
            log.info("feature cache %s: %d chunks of other examples kept (%.2f GiB; remove them to reclaim)",
                     self.folder, len(others), sum(p.stat().st_size for p in others) / 2 ** 30)
        if not todo:
            log.info("feature cache %s: complete (%d examples, %d tokens)", self.folder, len(self.examples),
                     self.manifest["tokens"])
            return
        print(f"feature cache {self.folder}: {len(self.examples)} examples, {self.manifest['tokens']} tokens, "
              f"~{self.size_bytes() / 2 ** 30:.2f} GiB on disk when complete; {len(todo)} of {self.n_chunks} chunks "
              f"to write (~{self.size_bytes(todo) / 2 ** 30:.2f} GiB), {self.n_chunks - len(todo)} reused", flush=True)
        for index in tqdm(todo, desc="parent features", unit="chunk", dynamic_ncols=True):
            examples = self._chunk_examples(index)
            feats = self._features(examples, features_of, batch_size)
            lengths = [len(e) for e in examples]
            tensors = {
                "ids": torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.int32),
                "maskable": torch.tensor([m for e in examples for m in e.maskable], dtype=torch.uint8),
                "offsets": torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64),
                "features": torch.cat(feats).to(torch.float16).contiguous(),
            }
            path = chunk_path(self.folder, self.digests[index])
            tmp = path.with_name(path.name + ".tmp")
            save_file(tensors, str(tmp), metadata={"digest": self.digests[index], "examples": str(len(examples)),
                                                   "tokens": str(sum(lengths))})
            os.replace(tmp, path)

    @staticmethod
    def _features(examples, features_of, batch_size: int) -> list[torch.Tensor]:
        """Per example, its features [len, F], computed in length-sorted batches."""
        order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
        out: list[torch.Tensor | None] = [None] * len(examples)
        for start in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[start:start + batch_size]]
            longest = max(len(e) for e in batch)
            ids = torch.zeros(len(batch), longest, dtype=torch.long)
            attention = torch.zeros(len(batch), longest, dtype=torch.long)
            for row, e in enumerate(batch):
                ids[row, :len(e)] = torch.tensor(e.input_ids)
                attention[row, :len(e)] = 1
            feats = features_of(ids, attention).float().cpu()
            for row, i in enumerate(order[start:start + batch_size]):
                out[i] = feats[row, :len(examples[i])]
        return out

    def load(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Every example as (ids [L], maskable [L], features [L, F] float16), in order; the cache must be complete."""
        out = []
        for index in range(self.n_chunks):
            chunk = self.load_chunk(index)
            if chunk is None:
                raise Ar2dlmError(f"feature cache {self.folder}: chunk {index} is missing or damaged (build it again)")
            for i in range(len(chunk.offsets) - 1):
                lo, hi = int(chunk.offsets[i]), int(chunk.offsets[i + 1])
                out.append((chunk.ids[lo:hi], chunk.maskable[lo:hi], chunk.features[lo:hi]))
        return out
