import pickle

import numpy as np
import pandas as pd

from funnel.events import vocab as vocab_module
from funnel.events.vocab import Vocab


def test_vocab_encode_decode_unknown_and_persistence(tmp_path):
    v = Vocab.fit(pd.Series(["x", "y", "x", "z"]))
    assert v.encode(["y", "nope", "x"]).tolist() == [2, 0, 1]
    assert v.decode(np.array([3, 0])).tolist() == ["z", ""]
    assert v.size == 4
    v2 = v.extend(["z", "w"])
    assert v2.encode(["x", "w"]).tolist() == [1, 4]
    v.save(str(tmp_path / "v.parquet"))
    assert Vocab.load(str(tmp_path / "v.parquet")).encode(["z"]).tolist() == [3]


def test_vocab_encodes_few_and_many_ids_alike():
    v = Vocab.fit(pd.Series([f"id{i}" for i in range(500)] + ["", "None"]))
    many = [f"id{i}" for i in range(0, 1000, 3)] + ["", "None", "nope"]  # over the one-by-one limit
    want = v.encode(many)
    assert want[:3].tolist() == [1, 4, 7] and want[-1] == 0
    for lo in range(0, len(many), 7):
        assert v.encode(many[lo : lo + 7]).tolist() == want[lo : lo + 7].tolist()
    assert v.encode(np.array(many[-3:], dtype=object)).tolist() == want[-3:].tolist()


def test_request_lookup_walks_colliding_hashes(monkeypatch):
    # A hash with many collisions: ids of one length share a hash, so every lookup
    # has to walk its run and let the string decide.
    monkeypatch.setattr(vocab_module, "hash", len, raising=False)
    v = Vocab.fit(pd.Series(["ab", "cd", "ef", "x", "yz", "longer"]))
    assert v.encode(["yz", "ab", "x", "cd", "zz", "q", "longer", "ef"]).tolist() == [5, 1, 4, 2, 0, 0, 6, 3]


def test_request_lookup_table_is_not_pickled():
    v = Vocab.fit(pd.Series(["a", "b"]))
    assert v.encode(["b"]).tolist() == [2]
    # hash() of a string differs between processes, so a copy sent to one must rebuild it.
    copy = pickle.loads(pickle.dumps(v))
    assert copy._hashes is None
    assert copy.encode(["a", "c"]).tolist() == [1, 0]
