"""The live engine and how it is replaced: load and validate a new bundle off the request path, then swap.

Readers take :attr:`EngineHolder.engine` once per batch; replacing it is one attribute
assignment, so a batch already running finishes on the engine it started with and the
next one sees the new engine. A bundle that fails to load or to answer a smoke query
is refused with a logged reason and the old engine keeps serving.
"""

import logging
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from funnel.bundle import BundleError, resolve
from funnel.server.query import RecommendQuery

log = logging.getLogger(__name__)


class BundleRefused(BundleError):
    """A new bundle failed validation; the message says why. The old bundle keeps serving."""


@dataclass(frozen=True)
class ReloadOutcome:
    """What a reload did: whether the engine changed, and the versions now served."""

    changed: bool
    model_version: str
    index_version: str


def smoke_test(engine) -> None:
    """Finite weights and vectors, then one real query through both stages that must return items.

    The serving path turns a NaN score into 0, so a damaged model would answer
    without error; its weights are checked directly.

    Raises:
        BundleRefused: for non-finite weights or item vectors, or when the query fails
            or its answer is empty or not finite.
    """
    bundle = engine.bundle
    for name, model in (("two-tower model", bundle.two_tower), ("ranker", bundle.ranker)):
        bad = [p for p, w in model.named_parameters() if not torch.isfinite(w).all()]
        if bad:
            raise BundleRefused(f"{bundle.path}: {name} has non-finite weights in {', '.join(bad[:3])}")
    if not np.isfinite(bundle.item_vecs).all():
        raise BundleRefused(f"{bundle.path}: item vectors are not all finite")
    data = bundle.data
    # The most active user exercises history, co-visitation and ranking at once.
    user = int(np.argmax(data.seqs.lengths)) if data.seqs.num_users else 0
    user_id = str(data.users.decode(np.array([user]))[0]) if data.seqs.num_users else "smoke-test"
    try:
        result = engine.recommend(RecommendQuery(user_id=user_id, k=10, request_id="bundle-smoke-test"))
    except Exception as err:  # noqa: BLE001 - any failure means the bundle cannot serve
        raise BundleRefused(f"smoke query failed: {type(err).__name__}: {err}") from err
    if not result.items:
        raise BundleRefused("smoke query returned no items")
    bad = [r.item_id for r in result.items if not (math.isfinite(r.score) and math.isfinite(r.recall_score))]
    if bad:
        raise BundleRefused(f"smoke query returned non-finite scores for items {bad[:5]}")


class EngineHolder:
    """Owns the serving engine and swaps in whatever the bundle root's ``CURRENT`` names.

    Args:
        engine: the engine to serve first.
        root: a bundle root (with ``CURRENT``; reloads follow it) or a version
            directory (reloads never change anything); ``None`` for an engine without
            a bundle on disk.
        version_dir: the version directory ``engine`` was loaded from.
        load: builds an engine from a version directory (e.g. ``Engine.load``).
        validate: raises :class:`BundleRefused` for an engine that must not serve;
            default :func:`smoke_test`.

    Attributes:
        engine: the serving engine; read it once per unit of work.
        on_swap: called with each engine swapped in (metrics); ``None`` for nothing.
        on_refuse: called with the reason of each refusal (metrics); ``None`` for nothing.
        fallback_from: the version (or ``CURRENT`` file) that could not serve at start-up
            when :meth:`open` fell back to an older version; ``None`` otherwise.
    """

    def __init__(
        self,
        engine,
        *,
        root: str | None = None,
        version_dir: str | None = None,
        load: Callable[[str], object] | None = None,
        validate: Callable[[object], None] = smoke_test,
    ) -> None:
        if root is not None and (version_dir is None or load is None):
            raise ValueError("a holder that follows a bundle root needs version_dir and load")
        self.engine = engine
        self.path = root
        self._version_dir = version_dir
        self._load = load
        self._validate = validate
        self.on_swap: Callable[[object], None] | None = None
        self.on_refuse: Callable[[str], None] | None = None
        self.fallback_from: str | None = None
        self._reload_lock = threading.Lock()
        self._refused: dict[str, str] = {}
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @classmethod
    def open(cls, path: str, load: Callable[[str], object], *, validate: Callable[[object], None] = smoke_test) -> "EngineHolder":
        """Load and validate the bundle ``path`` names (root or version directory) and hold it.

        When a bundle root's ``CURRENT`` names a version that cannot serve, the newest
        other version that loads and passes ``validate`` is served instead (logged, and
        recorded in :attr:`fallback_from`), so a restart after a bad publish is not an
        outage; the watcher moves on once ``CURRENT`` names another version.

        Raises:
            BundleError: no version can be loaded and serve (the reason for ``CURRENT``'s).
        """
        target = os.path.join(path, "CURRENT")
        try:
            target = resolve(path)
            engine = load(target)
            validate(engine)
            return cls(engine, root=path, version_dir=target, load=load, validate=validate)
        except Exception as err:  # noqa: BLE001 - whatever breaks CURRENT's version, an older one may serve
            reason = f"{type(err).__name__}: {err}" if not isinstance(err, BundleError) else str(err)
            versions = os.path.join(path, "versions")
            if not os.path.isdir(versions):
                raise BundleError(reason) from err
            for name in sorted((v for v in os.listdir(versions) if not v.startswith(".")), reverse=True):
                candidate = os.path.join(versions, name)
                if os.path.realpath(candidate) == os.path.realpath(target):
                    continue
                try:
                    engine = load(candidate)
                    validate(engine)
                except Exception as other:  # noqa: BLE001 - try the next older version
                    log.warning("fallback candidate %s cannot serve either: %s", candidate, other)
                    continue
                log.error("%s cannot serve (%s); serving the newest version that can: %s", target, reason, candidate)
                holder = cls(engine, root=path, version_dir=candidate, load=load, validate=validate)
                holder.fallback_from = target
                holder._refused[target] = reason  # the watcher retries only once CURRENT names another version
                return holder
            raise BundleError(f"{reason} (and no other version under {versions} can serve)") from err

    def reload(self) -> ReloadOutcome:
        """Load the version ``CURRENT`` names now, if it is not the one served, and swap it in.

        Runs on the calling thread; requests keep being served by the old engine meanwhile.

        Returns:
            Whether the engine changed and the versions served afterwards.

        Raises:
            BundleRefused: the named bundle is missing, corrupt or fails the smoke query.
        """
        with self._reload_lock:
            if self.path is None:
                return self._outcome(False)
            try:
                version_dir = resolve(self.path)
            except BundleError as err:
                raise self._refuse(os.path.join(self.path, "CURRENT"), str(err)) from err
            if os.path.realpath(version_dir) == os.path.realpath(self._version_dir):
                return self._outcome(False)
            try:
                engine = self._load(version_dir)
                self._validate(engine)
            except Exception as err:  # noqa: BLE001 - whatever breaks, the old engine keeps serving
                raise self._refuse(version_dir, f"{type(err).__name__}: {err}" if not isinstance(err, BundleError) else str(err)) from err
            old = self.engine
            self.engine = engine
            self._version_dir = version_dir
            self._refused.pop(version_dir, None)
            log.info(
                "bundle swapped: model %s -> %s, index %s -> %s (%s)",
                old.model_version, engine.model_version, old.index_version, engine.index_version, version_dir,
            )
            if self.on_swap is not None:
                self.on_swap(engine)
            return self._outcome(True)

    def start_watching(self, interval_s: float = 2.0) -> None:
        """Poll ``CURRENT`` every ``interval_s`` seconds on a daemon thread and reload when it changes.

        A refused version is logged once and not retried by the poller until
        ``CURRENT`` names another one (the ``Reload`` rpc always retries).
        """
        if self.path is None or self._watcher is not None:
            return
        self._watcher = threading.Thread(target=self._watch, args=(interval_s,), name="bundle-watcher", daemon=True)
        self._watcher.start()

    def stop_watching(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None

    def _watch(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                target = resolve(self.path)
            except BundleError as err:
                target = os.path.join(self.path, "CURRENT")
                if self._refused.get(target) != str(err):
                    self._refuse(target, str(err))
                continue
            if target in self._refused or os.path.realpath(target) == os.path.realpath(self._version_dir):
                continue
            try:
                self.reload()
            except BundleRefused:
                pass  # logged by _refuse; the old engine keeps serving
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad bundle
                log.exception("unexpected error while reloading %s", self.path)

    def _refuse(self, what: str, reason: str) -> BundleRefused:
        self._refused[what] = reason
        if self.on_refuse is not None:
            self.on_refuse(reason)
        message = reason if reason.startswith(what) else f"{what}: {reason}"
        log.error("bundle refused, still serving model %s / index %s: %s", self.engine.model_version, self.engine.index_version, message)
        return BundleRefused(message)

    def _outcome(self, changed: bool) -> ReloadOutcome:
        return ReloadOutcome(changed, self.engine.model_version, self.engine.index_version)
