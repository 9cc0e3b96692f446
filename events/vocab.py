"""Raw string id ↔ contiguous int id vocabularies, saved inside every bundle."""

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

PAD = 0
"""Id 0 never names a real entity: it pads sequences and stands for unknown ids."""
_SMALL = 256
"""Up to this many ids are encoded one by one (see :meth:`Vocab.encode`)."""


class Vocab:
    """Maps raw string ids to ints ``1..len(vocab)``; unknown ids encode to :data:`PAD`."""

    def __init__(self, raw_ids: pd.Index | np.ndarray | list[str]):
        index = pd.Index(pd.array(raw_ids, dtype="string[pyarrow]"))
        if index.has_duplicates:
            raise ValueError("vocabulary ids must be unique")
        self._index = index
        self._raw: np.ndarray | None = None  # object array of the ids, built on first decode

    @classmethod
    def fit(cls, values: pd.Series | np.ndarray) -> "Vocab":
        """Build a vocabulary from raw ids in order of first appearance."""
        return cls(pd.unique(pd.Series(values, dtype="string[pyarrow]")))

    def __len__(self) -> int:
        return len(self._index)

    @property
    def size(self) -> int:
        """Number of ids including the padding id (the embedding table size)."""
        return len(self._index) + 1

    def encode(self, values) -> np.ndarray:
        """Raw ids → int64 ids; unknown ids become :data:`PAD`."""
        if len(values) <= _SMALL and all(type(v) is str for v in values):
            # A request's few ids: hash lookups one by one take microseconds where building
            # an arrow array for get_indexer takes ~150 us.
            out = np.full(len(values), PAD, np.int64)
            for i, value in enumerate(values):
                try:
                    out[i] = self._index.get_loc(value) + 1
                except KeyError:
                    pass
            return out
        return self._index.get_indexer(pd.Index(pd.array(values, dtype="string[pyarrow]"))).astype(np.int64) + 1

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Int ids → raw string ids (object array); :data:`PAD` decodes to ``""``."""
        ids = np.asarray(ids)
        raw = np.empty(ids.shape, dtype=object)
        real = ids > 0
        if self._raw is None:
            # Converting the arrow-backed index costs O(vocabulary); serving decodes a few ids per request.
            self._raw = self._index.to_numpy(dtype=object)
        raw[real] = self._raw[ids[real] - 1]
        raw[~real] = ""
        return raw

    def extend(self, values) -> "Vocab":
        """A new vocabulary with unseen ``values`` appended; existing ids keep their numbers."""
        new = pd.unique(pd.Series(values, dtype="string[pyarrow]"))
        new = new[~pd.Index(new).isin(self._index)]
        return Vocab(self._index.append(pd.Index(new)))

    def save(self, path: str) -> None:
        """Write the ids, in id order, to a parquet file."""
        pq.write_table(pa.table({"id": pa.array(self._index.to_numpy(dtype=object), pa.string())}), path)

    @classmethod
    def load(cls, path: str) -> "Vocab":
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: vocabulary file missing")
        return cls(pq.read_table(path).column("id").to_pandas())
