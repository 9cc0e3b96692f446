"""An encoded behaviour log: vocabularies, item metadata and per-user sequences."""

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from funnel.events.readers import EventLog
from funnel.events.sequences import Sequences
from funnel.events.vocab import PAD, Vocab, is_integer_ids

_SEQ_FIELDS = ("offsets", "items", "categories", "behaviors", "ts")


@dataclass
class Dataset:
    """Everything later stages need from a log, with contiguous int ids.

    Attributes:
        users, items, categories: vocabularies (id 0 is padding/unknown).
        item_category: int64 [items.size]; the category id of each item id.
        item_title: object [items.size]; display titles ("" when unknown).
        seqs: time-ordered per-user sequences over the user id space ``users.size``.
        tags: vocabulary of item side-feature tags (e.g. genres).
        item_tags: int64 [items.size, T] tag ids per item, 0-padded (T may be 0).
        item_listed: bool [items.size]; items from a catalogue file, recommendable
            before their first interaction.
    """

    users: Vocab
    items: Vocab
    categories: Vocab
    item_category: np.ndarray
    item_title: np.ndarray
    seqs: Sequences
    tags: Vocab
    item_tags: np.ndarray
    item_listed: np.ndarray

    @property
    def end(self) -> int:
        """Time of the log's last event (0 for an empty log): a served request's time unless the user has newer events."""
        return int(self.seqs.ts.max()) if len(self.seqs) else 0

    @classmethod
    def from_log(cls, log: EventLog, catalogue: pd.DataFrame | None = None) -> "Dataset":
        """Encode a log, building vocabularies from it.

        Args:
            log: the behaviour log (its item metadata included).
            catalogue: extra item metadata (``item, category, title, tags``), e.g. from
                :func:`events.readers.read_items`; its items need no interactions and
                its rows win over the log's for items in both.
        """
        events = log.events
        items_meta = log.items
        if catalogue is not None and is_integer_ids(items_meta["item"]):
            items_meta = items_meta.astype({"item": "string[pyarrow]", "category": "string[pyarrow]"})  # a catalogue file's ids are strings
        meta = items_meta if catalogue is None else pd.concat([items_meta, catalogue], ignore_index=True).drop_duplicates("item", keep="last")
        # Fitted on the events, then extended by the metadata: the ids of a fit on both,
        # without concatenating a copy of the (possibly 100M-row) item column.
        users = Vocab.fit(events["user"])
        items = Vocab.fit(events["item"]).extend(meta["item"])
        categories = Vocab.fit(events["category"]).extend(meta["category"])
        item_category = np.zeros(items.size, dtype=np.int64)
        item_ids = items.encode(meta["item"])
        item_category[item_ids] = categories.encode(meta["category"])
        item_title = np.full(items.size, "", dtype=object)
        item_title[item_ids] = meta["title"].to_numpy(dtype=object)
        item_listed = np.zeros(items.size, dtype=bool)
        if catalogue is not None:
            item_listed[items.encode(catalogue["item"])] = True
        tagged = (meta["tags"].fillna("") != "").to_numpy(bool)  # split only items with tags: a 4M-item log may have none
        tag_lists = meta["tags"][tagged].str.split("|").map(lambda t: [x for x in t if x])
        tags = Vocab.fit(pd.Series([t for ts in tag_lists for t in ts], dtype="string[pyarrow]"))
        width = int(tag_lists.map(len).max()) if len(tag_lists) else 0
        item_tags = np.zeros((items.size, width), dtype=np.int64)
        for row, ts in zip(item_ids[tagged], tag_lists):
            item_tags[row, : len(ts)] = tags.encode(ts)
        seqs = Sequences.from_encoded(
            users.encode(events["user"]),
            items.encode(events["item"]),
            categories.encode(events["category"]),
            events["behavior"].to_numpy(),
            events["ts"].to_numpy(),
            users.size,
        )
        return cls(users, items, categories, item_category, item_title, seqs, tags, item_tags, item_listed)

    def encode_log(self, log: EventLog) -> Sequences:
        """Encode another log with this dataset's vocabularies; events on unknown users or items are dropped."""
        events = log.events
        users = self.users.encode(events["user"])
        items = self.items.encode(events["item"])
        known = (users != PAD) & (items != PAD)
        return Sequences.from_encoded(
            users[known], items[known], self.item_category[items[known]], events["behavior"].to_numpy()[known], events["ts"].to_numpy()[known], self.users.size
        )

    def grow(self, log: EventLog, unknown_category: str = "unknown") -> tuple["Dataset", np.ndarray]:
        """This dataset with another log's events added: new users, items and categories join the vocabularies.

        Existing ids keep their numbers, so a model trained on this dataset can be grown
        to the result by adding rows to its tables. Items already known keep their
        metadata; a new item takes the category its events give it (``unknown_category``
        where they give none), no title and no tags.

        Args:
            log: the added events (raw ids, e.g. from :func:`events.eventlog.read_event_store`).
            unknown_category: category of new items whose events name none.

        Returns:
            The grown dataset, and bool [N] marking the positions of its sequences that
            hold ``log``'s events.
        """
        events = log.events
        users = self.users.extend(events["user"])
        items = self.items.extend(events["item"])
        meta = log.items.drop_duplicates("item", keep="last")
        meta = meta[items.encode(meta["item"]) >= self.items.size]  # only new items take metadata from the log
        categories = meta["category"].astype("string[pyarrow]").fillna("").replace("", unknown_category)
        cats = self.categories.extend(categories)
        added = items.size - self.items.size
        item_category = np.concatenate([self.item_category, np.zeros(added, np.int64)])
        item_category[items.encode(meta["item"])] = cats.encode(categories)
        item_ids = items.encode(events["item"])
        extra = Sequences.from_encoded(
            users.encode(events["user"]),
            item_ids,
            item_category[item_ids],
            events["behavior"].to_numpy(),
            events["ts"].to_numpy(),
            users.size,
        )
        seqs, fresh = self.seqs.append(extra)
        return (
            Dataset(
                users,
                items,
                cats,
                item_category,
                np.concatenate([self.item_title, np.full(added, "", dtype=object)]),
                seqs,
                self.tags,
                np.concatenate([self.item_tags, np.zeros((added, self.item_tags.shape[1]), self.item_tags.dtype)]),
                np.concatenate([self.item_listed, np.zeros(added, bool)]),
            ),
            fresh,
        )

    def save(self, directory: str) -> None:
        """Write vocabularies, item metadata and sequences into ``directory``."""
        os.makedirs(directory, exist_ok=True)
        self.users.save(os.path.join(directory, "users.parquet"))
        self.items.save(os.path.join(directory, "items.parquet"))
        self.categories.save(os.path.join(directory, "categories.parquet"))
        self.tags.save(os.path.join(directory, "tags.parquet"))
        np.save(os.path.join(directory, "item_tags.npy"), self.item_tags)
        pd.DataFrame(
            {"category": self.item_category, "title": pd.array(self.item_title, dtype="string[pyarrow]"), "listed": self.item_listed}
        ).to_parquet(
            os.path.join(directory, "item_meta.parquet")
        )
        # One .npy per field, not an .npz: a plain array file can be memory-mapped, so the
        # server processes on a machine share one copy in the page cache.
        for f in _SEQ_FIELDS:
            np.save(os.path.join(directory, f"sequences_{f}.npy"), getattr(self.seqs, f))

    @classmethod
    def load(cls, directory: str) -> "Dataset":
        """Read what :meth:`save` wrote, checking that the pieces agree in size.

        The sequences are memory-mapped read-only (bundles before format 4 kept them in
        one ``sequences.npz``, which is read into memory).
        """
        users = Vocab.load(os.path.join(directory, "users.parquet"))
        items = Vocab.load(os.path.join(directory, "items.parquet"))
        categories = Vocab.load(os.path.join(directory, "categories.parquet"))
        tags = Vocab.load(os.path.join(directory, "tags.parquet"))
        item_tags = np.load(os.path.join(directory, "item_tags.npy"))
        meta = pd.read_parquet(os.path.join(directory, "item_meta.parquet"))
        legacy = os.path.join(directory, "sequences.npz")
        if os.path.isfile(legacy):
            with np.load(legacy) as npz:
                seqs = Sequences(**{f: npz[f] for f in _SEQ_FIELDS})
        else:
            seqs = Sequences(**{f: load_mapped(os.path.join(directory, f"sequences_{f}.npy")) for f in _SEQ_FIELDS})
        if len(meta) != items.size or len(item_tags) != items.size:
            raise ValueError(f"{directory}: item metadata has {len(meta)} rows for {items.size} item ids")
        if seqs.num_users != users.size or seqs.offsets[-1] != len(seqs.items):
            raise ValueError(f"{directory}: sequences do not match the user vocabulary")
        return cls(
            users, items, categories, meta["category"].to_numpy(np.int64), meta["title"].to_numpy(dtype=object), seqs, tags, item_tags, meta["listed"].to_numpy(bool)
        )


def load_mapped(path: str) -> np.ndarray:
    """A ``.npy`` file memory-mapped read-only, as a plain ndarray over the map (which it keeps alive).

    ``np.memmap`` is a Python subclass: each slice, and each ufunc result, of one runs
    Python hooks (``__array_finalize__``), 1.6 us where a plain view takes 0.16. Requests
    slice these arrays several times each.

    Args:
        path: the ``.npy`` file.

    Returns:
        The array, read-only.
    """
    return np.load(path, mmap_mode="r").view(np.ndarray)


def file_fingerprint(path: str) -> str:
    """sha256 over a file's bytes, or over every file of a directory in name order."""
    digest = hashlib.sha256()
    paths = [os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
    for p in paths:
        if os.path.isfile(p):
            digest.update(os.path.basename(p).encode())
            _hash_file(digest, p)
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    """Hex SHA-256 of one file's bytes."""
    return _hash_file(hashlib.sha256(), path).hexdigest()


def _hash_file(digest, path: str):
    """Feed a file to ``digest`` in 4 MiB blocks (bounded memory for multi-GB files); returns ``digest``."""
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest
