import json
import os

import pytest

from funnel.bundle import FORMAT_VERSION, BundleError, load_bundle, read_manifest, resolve
from funnel.server.engine import Engine
from funnel.server.query import RecommendQuery
from funnel.tools.rebuild_index import rebuild_index


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


def _as_format_3(tiny_bundle, root) -> None:
    """A bundle root whose only version looks like one written before the ONNX exports (format 3)."""
    import shutil

    version = root / "versions" / "old"
    shutil.copytree(resolve(tiny_bundle), version)
    manifest = json.loads((version / "manifest.json").read_text())
    for name in ("recall/user_tower.onnx", "rank/ranker.onnx"):
        os.remove(version / name)
        del manifest["files"][name], manifest["sha256"][name]
    manifest["format_version"] = 3
    (version / "manifest.json").write_text(json.dumps(manifest))
    (root / "CURRENT").write_text("old\n")


def test_format_3_is_refused_with_the_command_that_upgrades_it(tiny_bundle, tmp_path):
    root = tmp_path / "root"
    _as_format_3(tiny_bundle, root)
    with pytest.raises(BundleError, match=r"no ONNX exports .* `funnel rebuild-index --bundle ROOT --index flat`"):
        load_bundle(str(root))
    report = rebuild_index(bundle=str(root), index="flat", sample_users=20)
    upgraded = load_bundle(str(root))
    assert upgraded.path == report["version"] and upgraded.manifest["format_version"] == FORMAT_VERSION
    assert os.path.isfile(os.path.join(upgraded.path, "rank", "ranker.onnx")) and "recall/user_tower.onnx" in upgraded.manifest["files"]
    assert Engine(upgraded).recommend(RecommendQuery(user_id="x", k=5)).items


def test_sequences_and_item_vectors_are_memory_mapped(tiny_bundle):
    # Server processes on one machine share these through the page cache instead of each holding a copy.
    import numpy as np

    b = load_bundle(tiny_bundle)
    # Plain arrays over the maps: np.memmap's Python hooks would run on every slice a request takes.
    for a in (*(getattr(b.data.seqs, f) for f in ("offsets", "items", "categories", "behaviors", "ts")), b.item_vecs):
        assert type(a) is np.ndarray and isinstance(a.base, np.memmap) and not a.flags.writeable



def test_same_size_corruption_of_any_file_is_refused_naming_it(tiny_bundle, tmp_path):
    import shutil

    source = resolve(tiny_bundle)
    names = sorted(json.loads(open(os.path.join(source, "manifest.json")).read())["files"])
    assert {"recall/index.faiss", "recall/user_tower.onnx", "rank/ranker.onnx", "rank/ranker.pt", "data/sequences_items.npy"} <= set(names)
    for name in names:
        copy = tmp_path / name.replace("/", "_")
        shutil.copytree(source, copy)
        with open(copy / name, "r+b") as fh:
            size = fh.seek(0, 2)
            fh.seek(size // 2)
            byte = fh.read(1)
            fh.seek(size // 2)
            fh.write(bytes([byte[0] ^ 0xFF]))  # one flipped byte, same size
        with pytest.raises(BundleError, match=f"{name} does not match its SHA-256"):
            load_bundle(str(copy))


def test_verify_names_the_bad_file_and_exits_1(tiny_bundle, tmp_path, capsys):
    import shutil

    from funnel.tools.cli import main

    root = tmp_path / "root"
    shutil.copytree(tiny_bundle, root)
    assert main(["verify", str(root)]) == 0
    assert "ok " in capsys.readouterr().out
    version = resolve(str(root))
    with open(os.path.join(version, "recall", "item_vectors.npy"), "r+b") as fh:
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(b"\x00" if last != b"\x00" else b"\x01")  # same size, other content
    assert main(["verify", str(root)]) == 1
    out = capsys.readouterr().out
    assert "BAD" in out and "recall/item_vectors.npy does not match its SHA-256" in out and "(CURRENT)" in out


def test_large_bundles_log_their_checksum_progress(tiny_bundle, monkeypatch, caplog):
    import funnel.bundle as bundle_module

    monkeypatch.setattr(bundle_module, "HASH_PROGRESS_BYTES", 1)  # every bundle counts as large
    with caplog.at_level("INFO", logger="funnel.bundle"):
        bundle_module.read_manifest(bundle_module.resolve(tiny_bundle))
    lines = [r.getMessage() for r in caplog.records]
    assert "against their SHA-256" in lines[0] and lines[-1].endswith(" s") and "100% of the bundle" in lines[-1]


def test_bundle_with_other_ranking_features_is_refused(tiny_bundle, tmp_path):
    import shutil

    from funnel.rank.features import dense_names
    from funnel.rank.schema import register_feature, unregister

    assert [f["name"] for f in load_bundle(tiny_bundle).manifest["rank_features"]] == list(dense_names())
    copy = tmp_path / "copy"
    shutil.copytree(resolve(tiny_bundle), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["rank_features"] = [f for f in manifest["rank_features"] if f["name"] != "seen_hours"] + [{"name": "old_feature", "dtype": "float32"}]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="the code lacks old_feature; the bundle lacks seen_hours"):
        load_bundle(str(copy))
    # Code with a feature the (otherwise intact) bundle was not trained with refuses it too.
    group = register_feature("newer_feature", lambda batch: batch.cand_scores)
    try:
        with pytest.raises(BundleError, match="the bundle lacks newer_feature"):
            load_bundle(tiny_bundle)
    finally:
        unregister(group)


def test_ranker_kind_is_recorded_and_an_unknown_one_refused(tiny_bundle, tmp_path):
    import shutil

    from funnel.rank.contract import RankerModel

    bundle = load_bundle(tiny_bundle)
    assert bundle.manifest["ranker_kind"] == "din" and isinstance(bundle.ranker, RankerModel)
    copy = tmp_path / "copy"
    shutil.copytree(resolve(tiny_bundle), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["ranker_kind"] = "transformer"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="ranker kind 'transformer' is not registered"):
        load_bundle(str(copy))
