"""An encoded behaviour log: vocabularies, item metadata and per-user sequences."""

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from events.readers import EventLog
from events.sequences import Sequences
from events.vocab import PAD, Vocab

_SEQ_FIELDS = ("offsets", "items", "categories", "behaviors", "ts")


@dataclass
class Dataset:
    """Everything later stages need from a log, with contiguous int ids.

    Attributes:
        users, items, categories: vocabularies (id 0 is padding/unknown).
        item_category: int64 [items.size]; the category id of each item id.
        item_title: object [items.size]; display titles ("" when unknown).
        seqs: time-ordered per-user sequences over the user id space ``users.size``.
    """

    users: Vocab
    items: Vocab
    categories: Vocab
    item_category: np.ndarray
    item_title: np.ndarray
    seqs: Sequences

    @classmethod
    def from_log(cls, log: EventLog) -> "Dataset":
        """Encode a log, building vocabularies from it (items from events and metadata)."""
        events = log.events
        users = Vocab.fit(events["user"])
        items = Vocab.fit(pd.concat([events["item"], log.items["item"]], ignore_index=True))
        categories = Vocab.fit(pd.concat([events["category"], log.items["category"]], ignore_index=True))
        item_category = np.zeros(items.size, dtype=np.int64)
        item_ids = items.encode(log.items["item"])
        item_category[item_ids] = categories.encode(log.items["category"])
        item_title = np.full(items.size, "", dtype=object)
        item_title[item_ids] = log.items["title"].to_numpy(dtype=object)
        seqs = Sequences.from_encoded(
            users.encode(events["user"]),
            items.encode(events["item"]),
            categories.encode(events["category"]),
            events["behavior"].to_numpy(),
            events["ts"].to_numpy(),
            users.size,
        )
        return cls(users, items, categories, item_category, item_title, seqs)

    def encode_log(self, log: EventLog) -> Sequences:
        """Encode another log with this dataset's vocabularies; events on unknown users or items are dropped."""
        events = log.events
        users = self.users.encode(events["user"])
        items = self.items.encode(events["item"])
        known = (users != PAD) & (items != PAD)
        return Sequences.from_encoded(
            users[known], items[known], self.item_category[items[known]], events["behavior"].to_numpy()[known], events["ts"].to_numpy()[known], self.users.size
        )

    def save(self, directory: str) -> None:
        """Write vocabularies, item metadata and sequences into ``directory``."""
        os.makedirs(directory, exist_ok=True)
        self.users.save(os.path.join(directory, "users.parquet"))
        self.items.save(os.path.join(directory, "items.parquet"))
        self.categories.save(os.path.join(directory, "categories.parquet"))
        pd.DataFrame({"category": self.item_category, "title": pd.array(self.item_title, dtype="string[pyarrow]")}).to_parquet(
            os.path.join(directory, "item_meta.parquet")
        )
        np.savez(os.path.join(directory, "sequences.npz"), **{f: getattr(self.seqs, f) for f in _SEQ_FIELDS})

    @classmethod
    def load(cls, directory: str) -> "Dataset":
        """Read what :meth:`save` wrote, checking that the pieces agree in size."""
        users = Vocab.load(os.path.join(directory, "users.parquet"))
        items = Vocab.load(os.path.join(directory, "items.parquet"))
        categories = Vocab.load(os.path.join(directory, "categories.parquet"))
        meta = pd.read_parquet(os.path.join(directory, "item_meta.parquet"))
        with np.load(os.path.join(directory, "sequences.npz")) as npz:
            seqs = Sequences(**{f: npz[f] for f in _SEQ_FIELDS})
        if len(meta) != items.size:
            raise ValueError(f"{directory}: item metadata has {len(meta)} rows for {items.size} item ids")
        if seqs.num_users != users.size or seqs.offsets[-1] != len(seqs.items):
            raise ValueError(f"{directory}: sequences do not match the user vocabulary")
        return cls(users, items, categories, meta["category"].to_numpy(np.int64), meta["title"].to_numpy(dtype=object), seqs)


def file_fingerprint(path: str) -> str:
    """sha256 over a file's bytes, or over every file of a directory in name order."""
    digest = hashlib.sha256()
    paths = [os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
    for p in paths:
        if os.path.isfile(p):
            digest.update(os.path.basename(p).encode())
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    digest.update(block)
    return digest.hexdigest()
