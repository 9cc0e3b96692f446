"""The versioned bundle: vocabularies, sequences, both models, the index and a manifest.

The bundle is the contract between training and serving: ``funnel train`` and
``funnel learn`` write it here, the server and ``funnel evaluate`` load it here, and
neither side imports the other.

A bundle root holds ``versions/<version>/`` directories and a ``CURRENT`` file naming
the live one. A version is written completely under a temporary name, renamed into
place, and only then does ``CURRENT`` flip (``os.replace``), so a reader never sees a
half-written bundle. The manifest records each file's size and SHA-256, checked on load.
"""

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from funnel.events.dataset import Dataset, file_sha256, load_mapped
from funnel.rank.business import BusinessTables
from funnel.rank.contract import ranker_classes
from funnel.rank.features import dense_names
from funnel.rank.model import Ranker, export_ranker
from funnel.rank.pipeline import TwoStage
from funnel.rank.schema import check_schema, feature_schema, groups as feature_groups
from funnel.recall.channels import CoVisitation, Popularity
from funnel.recall.index import IndexSpec, load_index, save_index
from funnel.recall.model import TwoTower, TwoTowerConfig, export_user_tower
from funnel.recall.plugin import Channel, channel_class, find_channel
from funnel.recall.retriever import RecallConfig, Retriever
from funnel.recall.runtime import RUNTIMES
from funnel.recall.train import recommendable_items

log = logging.getLogger("funnel.bundle")

HASH_PROGRESS_BYTES = 1 << 30
"""Bundles at least this large log their checksum progress at load: hashing takes a few seconds a GB."""
FORMAT_VERSION = 4  # 2: multi-head ranker with business-feature tables; 3: low-rank cross layers; 4: ONNX exports, memory-mapped sequences
UPGRADABLE_FORMATS = (3,)
"""Older formats that ``funnel rebuild-index`` turns into the current one (it adds the ONNX exports)."""
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
INDEX_FILE = "recall/index.faiss"
VECTORS_FILE = "recall/item_vectors.npy"
POPULARITY_FILE = f"recall/{Popularity.FILE}"
BUSINESS_FILE = "rank/business.npz"
FEATURES_DIR = "rank/features"
USER_TOWER_ONNX = "recall/user_tower.onnx"
RANKER_ONNX = "rank/ranker.onnx"


class BundleError(ValueError):
    """A bundle is missing, incomplete, corrupt or of an unknown format."""


@dataclass
class Bundle:
    """Everything the server needs, loaded.

    Attributes:
        path: the version directory.
        manifest: the parsed manifest.
        data: vocabularies, item metadata and the full per-user sequences.
        two_tower, ranker: the models, in eval mode.
        item_vecs: [M, d] item-tower vectors (row 0 = padding).
        index: the FAISS index over ``item_vecs``.
        index_spec: how the index was built.
        channels: the recall channels beside the two-tower, in merge order.
        recall_config: candidate counts per channel.
        business: the ranker's business-feature tables (training part of the log).
        fitted: the registered feature groups' own statistics (:func:`rank.schema.fit_feature_tables`).
    """

    path: str
    manifest: dict
    data: Dataset
    two_tower: TwoTower
    ranker: Ranker
    item_vecs: np.ndarray
    index: object
    index_spec: IndexSpec
    channels: list[Channel]
    recall_config: RecallConfig
    business: BusinessTables
    fitted: dict[str, dict[str, np.ndarray]]

    @property
    def model_version(self) -> str:
        return self.manifest["model_version"]

    @property
    def index_version(self) -> str:
        return self.manifest["index_version"]

    @property
    def popularity(self) -> Popularity:
        """The popularity channel: its counts say which items training saw."""
        return self._channel(Popularity.name)

    @property
    def covisit(self) -> CoVisitation:
        """The co-visitation channel (also a ranking feature)."""
        return self._channel(CoVisitation.name)

    def _channel(self, name: str):
        try:
            return find_channel(self.channels, name)
        except KeyError as err:
            raise BundleError(f"{self.path}: {err.args[0]}, which this code needs") from err

    @property
    def recommendable(self) -> np.ndarray:
        """bool [M]: items the index holds (seen in training, or listed in the catalogue)."""
        return recommendable_items(self.data, self.popularity.counts > 0)

    def retriever(self, runtime: str = "onnx") -> Retriever:
        """The recall stage alone (what rebuilding the index needs: no ranker, no ranking tables).

        Args:
            runtime: ``onnx`` encodes users with ONNX Runtime over the bundle's export,
                ``torch`` with a frozen TorchScript copy of the user tower (a bundle's
                weights never change).
        """
        retriever = Retriever(self.two_tower, self.item_vecs, self.index, self.channels, self.data.item_category, self.recall_config, self.recommendable)
        if _runtime(runtime) == "onnx":
            retriever.use_onnx(self._onnx_file(USER_TOWER_ONNX))
        else:
            retriever.freeze()
        return retriever

    def pipeline(self, runtime: str = "onnx") -> TwoStage:
        """The two stages wired together for serving or evaluation.

        The popularity features are tabulated at the bundle's last event, the request
        time of every server request without newer behaviour.

        Args:
            runtime: ``onnx`` runs both models with ONNX Runtime over the bundle's exports
                (no torch work per request), ``torch`` runs frozen TorchScript copies.
        """
        pipeline = TwoStage(self.retriever(runtime), self.ranker, self.popularity.counts, self.business, self.fitted)
        pipeline.tables.business.fix_time(self.data_end)
        if runtime == "onnx":
            pipeline.use_onnx(self._onnx_file(RANKER_ONNX))
        else:
            pipeline.freeze()
        return pipeline

    def _onnx_file(self, name: str) -> str:
        path = os.path.join(self.path, name)
        if not os.path.isfile(path):
            raise BundleError(f"{self.path}: {name} is missing; add the ONNX exports with `funnel rebuild-index --bundle ROOT --index {self.index_spec}`")
        return path

    @property
    def data_end(self) -> int:
        """Time of the bundle's last event (0 for an empty log)."""
        return self.data.end


def new_version() -> str:
    """A sortable, unique version name: UTC time plus a short random suffix."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def resolve(path: str) -> str:
    """A bundle root (with ``CURRENT``) or a version directory → the version directory."""
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return path
    pointer = os.path.join(path, CURRENT)
    if not os.path.isfile(pointer):
        raise BundleError(f"{path}: not a bundle (no {MANIFEST} and no {CURRENT} file)")
    with open(pointer) as fh:
        version = fh.read().strip()
    target = os.path.join(path, "versions", version)
    if not os.path.isfile(os.path.join(target, MANIFEST)):
        raise BundleError(f"{pointer} names version {version!r}, which has no {MANIFEST}")
    return target


def save_model(model: torch.nn.Module, path: str) -> None:
    """Config dict + weights in one file, so a loader can rebuild the module."""
    torch.save({"config": model.cfg.to_dict(), "state_dict": model.state_dict()}, path)


def write_version(
    root: str,
    *,
    data: Dataset,
    two_tower: TwoTower,
    ranker: Ranker,
    item_vecs: np.ndarray,
    index,
    index_spec: IndexSpec,
    channels: Sequence[Channel],
    recall_config: RecallConfig,
    business: BusinessTables,
    info: dict,
    fitted: dict[str, dict[str, np.ndarray]] | None = None,
    publish: bool = True,
) -> str:
    """Write a complete new version under ``root`` and make it current.

    Args:
        root: the bundle root (created if missing).
        data, two_tower, ranker, item_vecs, index, index_spec, channels, recall_config,
            business: the pieces of the bundle (the channels in merge order).
        info: extra manifest fields (training data fingerprint, configs, metrics).
        fitted: the registered feature groups' own statistics, one ``rank/features/<name>.npz`` each.
        publish: False leaves the complete version in a hidden staging directory, which
            :func:`load_bundle` can load and :func:`publish_staged` publishes (or
            :func:`discard_staged` removes): for a version that must pass a check first.

    Returns:
        The new version directory (the staging directory when not ``publish``).
    """
    version = new_version()
    stage = _stage_dir(root)
    data.save(os.path.join(stage, "data"))
    os.makedirs(os.path.join(stage, "recall"))
    os.makedirs(os.path.join(stage, "rank"))
    save_model(two_tower, os.path.join(stage, "recall", "two_tower.pt"))
    np.save(os.path.join(stage, VECTORS_FILE), item_vecs)
    save_index(index, os.path.join(stage, INDEX_FILE))
    for channel in channels:
        channel.save(os.path.join(stage, "recall"))
    save_model(ranker, os.path.join(stage, "rank", "ranker.pt"))
    business.save(os.path.join(stage, BUSINESS_FILE))
    if fitted:
        os.makedirs(os.path.join(stage, FEATURES_DIR))
    for name, arrays in (fitted or {}).items():
        np.savez(os.path.join(stage, FEATURES_DIR, f"{name}.npz"), **arrays)
    export_user_tower(two_tower, os.path.join(stage, USER_TOWER_ONNX))
    export_ranker(ranker, os.path.join(stage, RANKER_ONNX))
    manifest = {
        "format_version": FORMAT_VERSION,
        "model_version": version,
        "index_version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "index_spec": str(index_spec),
        "recall_config": recall_config.resolved([c.name for c in channels]).to_dict(),
        "recall_channels": [c.name for c in channels],
        "two_tower_config": two_tower.cfg.to_dict(),
        "ranker_kind": ranker.kind,
        "ranker_config": ranker.cfg.to_dict(),
        "rank_features": feature_schema(),
        "rank_feature_tables": sorted(fitted or {}),
        "counts": {"users": len(data.users), "items": len(data.items), "categories": len(data.categories), "events": int(len(data.seqs))},
        **info,
    }
    if not publish:
        _seal(stage, manifest)
        return stage
    return _publish(root, stage, version, manifest)


def replace_index(
    root: str,
    *,
    index,
    index_spec: IndexSpec,
    item_vecs: np.ndarray,
    data: Dataset | None = None,
    item_counts: np.ndarray | None = None,
    info: dict | None = None,
    models: "tuple[TwoTower, Ranker] | None" = None,
) -> str:
    """Publish a new version with a new index (and, when the catalogue grew, new item data).

    Files that do not change are hard-linked (copied where links are not possible),
    so a rebuild costs only what it rewrites; the models are shared unchanged.

    Args:
        root: bundle root with ``CURRENT``.
        index, index_spec: the new index and how it was built.
        item_vecs: [M, d] item vectors the index holds.
        data: the dataset with an extended catalogue, when new items were added.
        item_counts: [M] training counts matching ``data`` (new items count 0).
        info: extra manifest fields.
        models: the bundle's two-tower and ranker, exported to ONNX again, so a rebuild
            also brings the exports up to this Funnel's graph (and adds them to a bundle
            of an older format); without them the current exports are linked.

    Returns:
        The new version directory.
    """
    current = resolve(root)
    manifest = read_manifest(current, upgrade=True)
    if os.path.abspath(current) == os.path.abspath(root):
        raise BundleError(f"{root} is a single version directory; rebuilding needs a bundle root with {CURRENT}")
    rewritten = {INDEX_FILE, VECTORS_FILE, USER_TOWER_ONNX, RANKER_ONNX} | ({POPULARITY_FILE} if data is not None else set())
    stage = _stage_dir(root)
    for name in manifest["files"]:
        if name in rewritten or (data is not None and name.startswith("data/")):
            continue
        os.makedirs(os.path.dirname(os.path.join(stage, name)), exist_ok=True)
        _link_or_copy(os.path.join(current, name), os.path.join(stage, name))
    os.makedirs(os.path.join(stage, "recall"), exist_ok=True)
    save_index(index, os.path.join(stage, INDEX_FILE))
    np.save(os.path.join(stage, VECTORS_FILE), item_vecs)
    _export_onnx(current, stage, models)
    if data is not None:
        data.save(os.path.join(stage, "data"))
        np.save(os.path.join(stage, POPULARITY_FILE), item_counts)
        manifest["counts"] = {**manifest.get("counts", {}), "items": len(data.items), "categories": len(data.categories)}
    version = new_version()
    manifest = {k: v for k, v in manifest.items() if k not in ("files", "sha256")}
    manifest["format_version"] = FORMAT_VERSION
    manifest.update(index_version=version, index_spec=str(index_spec), previous_version=os.path.basename(current), **(info or {}))
    return _publish(root, stage, version, manifest)


def _export_onnx(current: str, stage: str, models: "tuple[TwoTower, Ranker] | None") -> None:
    """The ONNX exports for a new version: exported from ``models`` when given, else linked from ``current``."""
    for name, export, model in ((USER_TOWER_ONNX, export_user_tower, 0), (RANKER_ONNX, export_ranker, 1)):
        if models is not None:
            os.makedirs(os.path.dirname(os.path.join(stage, name)), exist_ok=True)
            export(models[model], os.path.join(stage, name))
        elif os.path.isfile(os.path.join(current, name)):
            _link_or_copy(os.path.join(current, name), os.path.join(stage, name))
        else:
            raise BundleError(f"{current}: {name} is missing and no models were given to export it")


def _stage_dir(root: str) -> str:
    os.makedirs(os.path.join(root, "versions"), exist_ok=True)
    return tempfile.mkdtemp(prefix=".staging-", dir=os.path.join(root, "versions"))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _seal(stage: str, manifest: dict) -> None:
    """Record every staged file's size and SHA-256 in the manifest and write it."""
    names = sorted(os.path.relpath(os.path.join(d, f), stage) for d, _, files in os.walk(stage) for f in files)
    manifest["files"] = {name: os.path.getsize(os.path.join(stage, name)) for name in names}
    manifest["sha256"] = {name: file_sha256(os.path.join(stage, name)) for name in names}
    _write_atomic(os.path.join(stage, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True))


def _publish(root: str, stage: str, version: str, manifest: dict) -> str:
    _seal(stage, manifest)
    return _move_in(root, stage, version)


def _move_in(root: str, stage: str, version: str) -> str:
    final = os.path.join(root, "versions", version)
    os.replace(stage, final)
    _write_atomic(os.path.join(root, CURRENT), version + "\n")
    return final


def publish_staged(root: str, stage: str, info: dict | None = None) -> str:
    """Publish a version that :func:`write_version` left staged: rename it into place and flip ``CURRENT``.

    Args:
        root: the bundle root it was staged under.
        stage: the staging directory.
        info: manifest fields to add first (the manifest is re-sealed; files are unchanged).

    Returns:
        The published version directory.
    """
    manifest = read_manifest(stage)
    if info:
        manifest.update(info)
        _write_atomic(os.path.join(stage, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True))
    return _move_in(root, stage, manifest["model_version"])


def discard_staged(stage: str) -> None:
    """Remove a staged version that will not be published."""
    shutil.rmtree(stage, ignore_errors=True)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:6]}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_manifest(version_dir: str, upgrade: bool = False) -> dict:
    """Parse and check a version's manifest: known format, every file present with its recorded size.

    Args:
        version_dir: the version directory.
        upgrade: also accept the formats in :data:`UPGRADABLE_FORMATS` (for ``rebuild-index``,
            which writes the current format).
    """
    path = os.path.join(version_dir, MANIFEST)
    try:
        with open(path) as fh:
            manifest = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise BundleError(f"{path}: unreadable manifest ({err})") from err
    found = manifest.get("format_version")
    if found in UPGRADABLE_FORMATS and not upgrade:
        raise BundleError(
            f"{path}: bundle format {found} has no ONNX exports of its models, which this Funnel serves with; "
            f"`funnel rebuild-index --bundle ROOT --index {manifest.get('index_spec', 'flat')}` exports them into a new version (no retraining)"
        )
    if found != FORMAT_VERSION and not (upgrade and found in UPGRADABLE_FORMATS):
        raise BundleError(f"{path}: bundle format {found!r}, this Funnel reads {FORMAT_VERSION}; retrain it with `funnel train`")
    for name, size in manifest.get("files", {}).items():
        full = os.path.join(version_dir, name)
        if not os.path.isfile(full):
            raise BundleError(f"{version_dir}: {name} is missing")
        if os.path.getsize(full) != size:
            raise BundleError(f"{version_dir}: {name} is {os.path.getsize(full)} bytes, the manifest says {size}")
    # Same-size damage (a bad disk block, a partial overwrite) shows only in the content.
    digests = manifest.get("sha256", {})
    hashed = {name: size for name, size in manifest.get("files", {}).items() if name in digests}
    total, done, started = sum(hashed.values()), 0, time.monotonic()
    if total >= HASH_PROGRESS_BYTES:
        log.info("%s: checking %d files (%.1f GB) against their SHA-256", version_dir, len(hashed), total / 1e9)
    for name, size in hashed.items():
        if file_sha256(os.path.join(version_dir, name)) != digests[name]:
            raise BundleError(f"{version_dir}: {name} does not match its SHA-256 in the manifest (damaged or changed after publishing)")
        done += size
        if total >= HASH_PROGRESS_BYTES and size >= HASH_PROGRESS_BYTES // 4:
            log.info("%s: %s checked; %.0f%% of the bundle in %.0f s", version_dir, name, 100 * done / total, time.monotonic() - started)
    return manifest


def _load_model(path: str, cls, config_cls):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged file; all mean the same here
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise BundleError(f"{path}: not a readable model checkpoint ({type(err).__name__}: {first_line})") from err
    model = cls(config_cls(**ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def load_bundle(path: str, device: str = "cpu", candidates: dict[str, int] | None = None, upgrade: bool = False) -> Bundle:
    """Load and validate a bundle (root or version directory).

    Args:
        path: bundle root or version directory.
        device: where the models go.
        candidates: per-channel candidate counts replacing the manifest's
            (:meth:`recall.retriever.RecallConfig.parse_counts`); fewer candidates rank faster.
        upgrade: also load an older format that ``rebuild-index`` can upgrade (see :func:`read_manifest`).

    Raises:
        BundleError: when anything is missing, truncated or inconsistent.
    """
    version_dir = resolve(path)
    manifest = read_manifest(version_dir, upgrade)
    join = lambda *p: os.path.join(version_dir, *p)
    try:
        data = Dataset.load(join("data"))
        two_tower = _load_model(join("recall", "two_tower.pt"), TwoTower, TwoTowerConfig).to(device)
        # Bundles written before the kind was recorded hold the DIN-style ranker.
        ranker = _load_model(join("rank", "ranker.pt"), *ranker_classes(manifest.get("ranker_kind", Ranker.kind))).to(device)
        item_vecs = load_mapped(join(VECTORS_FILE))  # shared by the server processes through the page cache
        spec = IndexSpec.parse(manifest["index_spec"])
        index = load_index(join(INDEX_FILE), spec)
        # Bundles written before the channels were recorded hold the two built-in ones.
        channels = [channel_class(name).load(join("recall")) for name in manifest.get("recall_channels", ("covisit", "popular"))]
        business = BusinessTables.load(join(BUSINESS_FILE))
        fitted = {name: _load_arrays(join(FEATURES_DIR, f"{name}.npz")) for name in manifest.get("rank_feature_tables", ())}
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise BundleError(f"{version_dir}: cannot load bundle ({err})") from err
    # The catalogue may have grown after training (rebuild-index --items); the models'
    # tables may be smaller than it, never larger.
    try:
        counts = find_channel(channels, Popularity.name).counts
    except KeyError as err:
        raise BundleError(f"{version_dir}: {err.args[0]}, whose counts say which items training saw") from err
    sizes = {"item vectors": len(item_vecs), "popularity": len(counts), "vocabulary": data.items.size}
    if len(set(sizes.values())) != 1 or max(two_tower.cfg.num_items, ranker.cfg.num_items, len(business.item)) > data.items.size:
        raise BundleError(f"{version_dir}: item id spaces disagree: {sizes}, model tables {two_tower.cfg.num_items}/{ranker.cfg.num_items}, business table {len(business.item)}")
    _check_features(version_dir, manifest, ranker, fitted)
    bundle = Bundle(
        version_dir, manifest, data, two_tower, ranker, item_vecs, index, spec, channels,
        RecallConfig.from_dict({**manifest["recall_config"], **(candidates or {})}), business, fitted,
    )
    recommendable = int(bundle.recommendable.sum())
    if index.ntotal != recommendable:
        raise BundleError(f"{version_dir}: index holds {index.ntotal} vectors for {recommendable} recommendable items")
    return bundle


def _load_arrays(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _check_features(version_dir: str, manifest: dict, ranker: Ranker, fitted: dict) -> None:
    """Refuse a bundle whose ranker reads other dense features than this code builds (it would score garbage), or lacks a feature's fitted statistics."""
    try:
        if "rank_features" in manifest:  # bundles written before the schema was recorded hold the built-in list
            check_schema(manifest["rank_features"])
        if ranker.cfg.num_dense != len(dense_names()):
            raise ValueError(f"the ranker reads {ranker.cfg.num_dense} dense features, this code builds {len(dense_names())} ({', '.join(dense_names())})")
        if unfitted := [g.names[0] for g in feature_groups() if g.fit is not None and g.names[0] not in fitted]:
            raise ValueError(f"no fitted statistics for the features {', '.join(unfitted)} (trained before they had fit); retrain the bundle")
    except ValueError as err:
        raise BundleError(f"{version_dir}: {err}") from err


def _runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    return runtime
