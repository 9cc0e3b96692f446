"""Raw string id ↔ contiguous int id vocabularies, saved inside every bundle."""

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

PAD = 0
"""Id 0 never names a real entity: it pads sequences and stands for unknown ids."""
_SMALL = 256
"""Up to this many string ids are encoded through the hash table (see :meth:`Vocab.encode`)."""


class Vocab:
    """Maps raw string ids to ints ``1..len(vocab)``; unknown ids encode to :data:`PAD`.

    Raw ids may also come as integers (an ingested Taobao log stores them so): the
    integer ``7`` is the string id ``"7"``. Integer ids are fitted and encoded through an
    integer hash index, so a 100M-event log is never turned into strings.
    """

    def __init__(self, raw_ids: pd.Index | np.ndarray | list[str]):
        index = pd.Index(pd.array(raw_ids, dtype="string[pyarrow]"))
        if index.has_duplicates:
            raise ValueError("vocabulary ids must be unique")
        self._index = index
        self._raw: np.ndarray | None = None  # object array of the ids, built on first decode or lookup
        self._ints: pd.Index | None | bool = None  # integer twin of _index; False when some id is not a canonical integer
        self._hashes: tuple[np.ndarray, np.ndarray] | None = None  # (sorted hash(id), their 0-based ids), built on first small encode

    def __getstate__(self) -> dict:
        # hash() of a string differs between Python processes: another process rebuilds the table.
        return {**self.__dict__, "_hashes": None}

    @classmethod
    def fit(cls, values: pd.Series | np.ndarray) -> "Vocab":
        """Build a vocabulary from raw ids (strings or integers) in order of first appearance."""
        if is_integer_ids(values):
            uniques = pd.unique(np.asarray(values, dtype=np.int64))
            vocab = cls(uniques.astype(str))
            vocab._ints = pd.Index(uniques)
            return vocab
        return cls(pd.unique(pd.Series(values, dtype="string[pyarrow]")))

    def __len__(self) -> int:
        return len(self._index)

    @property
    def size(self) -> int:
        """Number of ids including the padding id (the embedding table size)."""
        return len(self._index) + 1

    def encode(self, values) -> np.ndarray:
        """Raw ids (strings, or integers for integer ids) → int64 ids; unknown ids become :data:`PAD`."""
        if is_integer_ids(values):
            ints = self._integer_index()
            if ints is not None:
                return ints.get_indexer(np.asarray(values, dtype=np.int64)).astype(np.int64) + 1
            values = np.asarray(values).astype(str)
        if len(values) <= _SMALL and all(type(v) is str for v in values):
            return self._lookup(values)
        return self._index.get_indexer(pd.Index(pd.array(values, dtype="string[pyarrow]"))).astype(np.int64) + 1

    def prepare_lookup(self) -> None:
        """Build what encoding a request's few ids needs (:meth:`encode`), so the first request does not pay for it.

        Python's ``hash`` of every id, sorted, and the ids as Python strings: about 16
        bytes per id plus the strings, a few hundred ms per million ids.
        """
        if self._hashes is None:
            raw = self._strings()
            hashes = np.fromiter(map(hash, raw), np.int64, len(raw))
            order = np.argsort(hashes, kind="stable")
            self._hashes = hashes[order], order

    def _lookup(self, values: list[str]) -> np.ndarray:
        """Encode a few string ids by binary search over their hashes (:meth:`prepare_lookup`).

        A request's ids go through here. With the caches cold after the CPU idled, a
        pandas index lookup costs ~150 us an id and this about half; every numpy call
        costs tens of microseconds cold, so it keeps to scalar calls.
        """
        self.prepare_lookup()
        hashes, order = self._hashes
        raw, size = self._raw, len(hashes)
        out = []
        for value in values:
            h, found = hash(value), PAD
            j = int(hashes.searchsorted(h))
            # Ids whose hashes collide sit side by side; the string itself decides.
            while j < size and hashes[j] == h:
                if raw[order[j]] == value:
                    found = int(order[j]) + 1
                    break
                j += 1
            out.append(found)
        return np.array(out, np.int64)

    def _strings(self) -> np.ndarray:
        """The ids as an object array of Python strings, in id order (0-based), built once."""
        if self._raw is None:
            # Converting the arrow-backed index costs O(vocabulary); serving decodes a few ids per request.
            self._raw = self._index.to_numpy(dtype=object)
        return self._raw

    def _integer_index(self) -> pd.Index | None:
        """The ids as an integer index, when every id is a canonical integer ("7", not "007")."""
        if self._ints is None:
            strings = self._index.to_numpy(dtype=object)
            try:
                ints = np.array(strings, dtype=np.int64) if len(strings) else np.zeros(0, np.int64)
                self._ints = pd.Index(ints) if (ints.astype(str) == strings.astype(str)).all() else False
            except (ValueError, OverflowError):
                self._ints = False
        return self._ints if self._ints is not False else None

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Int ids → raw string ids (object array); :data:`PAD` decodes to ``""``."""
        ids = np.asarray(ids)
        raw = np.empty(ids.shape, dtype=object)
        real = ids > 0
        raw[real] = self._strings()[ids[real] - 1]
        raw[~real] = ""
        return raw

    def extend(self, values) -> "Vocab":
        """A vocabulary with unseen ``values`` appended (``self`` when there are none); existing ids keep their numbers."""
        ints = self._integer_index() if is_integer_ids(values) else None
        if ints is not None:
            new = pd.unique(np.asarray(values, dtype=np.int64))
            new = new[ints.get_indexer(new) < 0]
            if not len(new):
                return self
            vocab = Vocab(self._index.append(pd.Index(pd.array(new.astype(str), dtype="string[pyarrow]"))))
            vocab._ints = ints.append(pd.Index(new))
            return vocab
        if is_integer_ids(values):
            values = np.asarray(values).astype(str)
        new = pd.array(pd.unique(pd.Series(values, dtype="string[pyarrow]")), dtype="string[pyarrow]")
        new = new[self._index.get_indexer(new) < 0]  # a hash lookup: isin on arrow strings walks them in Python
        return Vocab(self._index.append(pd.Index(new))) if len(new) else self

    def save(self, path: str) -> None:
        """Write the ids, in id order, to a parquet file."""
        pq.write_table(pa.table({"id": pa.array(self._index.to_numpy(dtype=object), pa.string())}), path)

    @classmethod
    def load(cls, path: str) -> "Vocab":
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: vocabulary file missing")
        return cls(pq.read_table(path).column("id").to_pandas())


def is_integer_ids(values) -> bool:
    """Whether ``values`` is an array or series of integers (raw ids stored as numbers)."""
    dtype = getattr(values, "dtype", None)
    return dtype is not None and pd.api.types.is_integer_dtype(dtype)
