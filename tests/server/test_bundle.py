import json
import os

import pytest

from server.bundle import BundleError, load_bundle, read_manifest, resolve


def test_bundle_loads_and_manifest_records_data(tiny_bundle, tiny_log_path):
    b = load_bundle(tiny_bundle)
    assert b.model_version == b.index_version == os.path.basename(b.path)
    assert b.manifest["data"]["split"] == "leave-last-out"
    assert len(b.manifest["data"]["fingerprint"]) == 64
    assert b.index.ntotal == b.recommendable.sum() <= len(b.data.items)
    assert b.manifest["files"]["recall/index.faiss"] > 0


def test_truncated_file_is_refused(tiny_bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(resolve(tiny_bundle), copy)
    with open(copy / "recall" / "item_vectors.npy", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(BundleError, match="item_vectors.npy is 100 bytes"):
        load_bundle(str(copy))


def test_unknown_format_and_missing_pointer(tiny_bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(resolve(tiny_bundle), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="bundle format 99"):
        read_manifest(str(copy))
    with pytest.raises(BundleError, match="not a bundle"):
        load_bundle(str(tmp_path))
