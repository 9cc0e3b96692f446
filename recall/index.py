"""One FAISS index factory for item vectors: exact Flat, IVF, IVF-PQ and HNSW, on GPU or CPU.

Every index searches by inner product, the similarity the towers trained on, and
stores item ids (not row numbers) so new items can be added without a rebuild.
A spec is written as a short string, e.g. ``flat``, ``ivf:nlist=1024,nprobe=32``,
``ivfpq:nlist=1024,m=16,nprobe=32`` or ``hnsw:m=32,ef_search=128``; IVF settings left
out are sized to the catalogue (plain ``ivf`` is the tested choice up to a million items).
An ``ivf`` index keeps its vectors as 16-bit floats unless ``codes`` says otherwise.
"""

import math
from dataclasses import asdict, dataclass, fields, replace

import faiss
import numpy as np

from funnel.evaluation.metrics import overlap_recall
from funnel.recall.scoring import exact_topk

KINDS = ("flat", "ivf", "ivfpq", "hnsw")
IVF_CODES: dict[str, str] = {"f16": "SQfp16", "f32": "Flat", "sq8": "SQ8"}
"""How an ``ivf`` index stores the vectors in its cells (the faiss factory's name for each).

``f16`` is the default: a query scans half the bytes of ``f32`` and finds the same
items (recall@150 against exact search 0.966 either way on the 100k-item synthetic
bundle), 0.42 instead of 0.61 ms for a lone query with cold caches and 19% less per
query in batches. Scores differ from exact inner products by about 1e-3 relative.
``sq8`` (8 bits per dimension) is faster again in batches and loses a little recall."""


@dataclass(frozen=True)
class IndexSpec:
    """What index to build; ``0`` for ``nlist`` or ``nprobe`` means "pick from the catalogue size".

    Attributes:
        kind: one of :data:`KINDS`.
        nlist: IVF cells (0: :func:`auto_nlist`).
        nprobe: IVF cells visited per query (0: :func:`auto_nprobe`).
        m: PQ sub-quantisers (ivfpq) or graph degree (hnsw).
        nbits: bits per PQ code.
        ef_search, ef_construction: HNSW search / build breadth.
        gpu: ``"auto"`` uses a GPU when faiss sees one, ``"never"`` forces the CPU.
        codes: how ``ivf`` stores vectors, one of :data:`IVF_CODES` (other kinds ignore it).
    """

    kind: str = "flat"
    nlist: int = 0
    nprobe: int = 0
    m: int = 32
    nbits: int = 8
    ef_search: int = 128
    ef_construction: int = 200
    gpu: str = "auto"
    codes: str = "f16"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown index kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.gpu not in ("auto", "never"):
            raise ValueError(f"gpu must be 'auto' or 'never', not {self.gpu!r}")
        if self.codes not in IVF_CODES:
            raise ValueError(f"codes must be one of {', '.join(IVF_CODES)}, not {self.codes!r}")
        for name in ("nlist", "nprobe", "m", "nbits", "ef_search", "ef_construction"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    @classmethod
    def parse(cls, text: str) -> "IndexSpec":
        """``"ivf:nlist=1024,nprobe=32"`` → IndexSpec. Raises ValueError naming the bad part."""
        kind, _, rest = text.strip().lower().partition(":")
        known = {f.name: f.type for f in fields(cls)}
        values: dict = {}
        for part in filter(None, (p.strip() for p in rest.split(","))):
            key, eq, value = part.partition("=")
            if not eq or key not in known or key == "kind":
                raise ValueError(f"bad index option {part!r} in {text!r}; options: {', '.join(k for k in known if k != 'kind')}")
            try:
                values[key] = value if key in ("gpu", "codes") else int(value)
            except ValueError:
                raise ValueError(f"index option {key} needs an integer, got {value!r}") from None
        return cls(kind=kind, **values)

    def __str__(self) -> str:
        default = IndexSpec(kind=self.kind)
        opts = [f"{k}={v}" for k, v in asdict(self).items() if k != "kind" and v != getattr(default, k)]
        return self.kind + (":" + ",".join(opts) if opts else "")

    def to_dict(self) -> dict:
        return asdict(self)


# k-means on this many points per cell places the centroids about as well as on the
# whole catalogue (faiss warns below 39) while bounding the training cost at 1M items.
TRAIN_POINTS_PER_CELL = 64
MAX_AUTO_NLIST = 4096
# Share of the cells visited when nprobe is left to auto_nprobe: top-200 results spill
# over many neighbouring cells, so a fixed nprobe would lose recall as nlist grows.
AUTO_NPROBE_SHARE = 1 / 48
MIN_AUTO_NPROBE = 16


def auto_nlist(n: int) -> int:
    """About 4·√n cells, never fewer than 39 training points per cell, at most :data:`MAX_AUTO_NLIST`.

    The cap keeps training and assigning a million items within seconds on two cores;
    beyond it more cells buy little query speed at the recall depth the recall stage uses.
    """
    return max(1, min(int(4 * math.sqrt(n)), n // 39, MAX_AUTO_NLIST))


def auto_nprobe(nlist: int) -> int:
    """Cells visited per query when the spec leaves ``nprobe`` at 0: a fixed share of ``nlist``."""
    return min(nlist, max(MIN_AUTO_NPROBE, math.ceil(nlist * AUTO_NPROBE_SHARE)))


AUTO_IVF_MIN_ITEMS = 15_000
"""Catalogue size from which ``train`` builds an IVF index instead of exact search by default:
exact top-200 over 64-d vectors costs about 0.3 ms a query on one CPU core at this size
(measured 0.45 ms at 20k, 1.2-1.6 ms at 56k; an auto-sized IVF 0.13 ms at 56k)."""
MIN_GATE_RECALL = 0.95
"""Recall@k against exact search on real user vectors an approximate index must reach to be published."""


def tune_nprobe(index: faiss.Index, spec: IndexSpec, queries: np.ndarray, item_vecs: np.ndarray, among: np.ndarray, k: int, min_recall: float) -> tuple[IndexSpec, dict[str, float]]:
    """The fewest IVF cells to probe for recall@k against exact search to reach ``min_recall``.

    Recall is the share of the exact top-k ids the index returns for the same queries.
    The probe count doubles until recall reaches ``min_recall``, then a bisection between
    the last two counts finds the smallest that does (to within a sixteenth): probing
    more cells only adds candidates, so recall does not fall as the count grows, and
    each cell probed costs every query.

    Trained item vectors cluster less than k-means cells assume, so the probe count sized
    from the catalogue alone often falls short. The search stops at a quarter of the
    cells: beyond that exact search costs about as much.

    Args:
        index: a built IVF index (configured to the returned spec on return).
        spec: its resolved spec; ``nprobe`` is where the search starts.
        queries: [Q, d] real user vectors (:func:`recall.train.serving_user_vectors`).
        item_vecs: [M, d] every item's vector (row 0 padding).
        among: bool [M], the items the index holds (exact search scores only these).
        k: the depth compared.
        min_recall: the recall to reach.

    Returns:
        The spec chosen (the smallest probe count that passed, or the widest tried) and
        spec -> measured recall for every spec tried, in the order tried.
    """
    exact, _ = exact_topk(queries, item_vecs, k, among=among)  # the same for every nprobe: scored once
    tried: dict[str, float] = {}

    def passes(nprobe: int) -> bool:
        trial = replace(spec, nprobe=nprobe)
        configure(index, trial)
        tried[str(trial)] = round(float(overlap_recall(search(index, queries, k)[0], exact)), 5)
        return tried[str(trial)] >= min_recall

    widest = max(spec.nprobe, spec.nlist // 4)
    short, nprobe = 0, spec.nprobe  # short: the largest count known to fall short
    while not passes(nprobe):
        if nprobe >= widest:
            return replace(spec, nprobe=nprobe), tried
        short, nprobe = nprobe, min(nprobe * 2, widest)
    while nprobe - short > max(1, nprobe // 16):
        middle = (short + nprobe) // 2
        short, nprobe = (short, middle) if passes(middle) else (middle, nprobe)
    chosen = replace(spec, nprobe=nprobe)
    configure(index, chosen)
    return chosen, tried


def gpu_available() -> bool:
    """True when this faiss build sees at least one GPU."""
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


_GPU_RESOURCES = None


def _gpu_resources():
    # One StandardGpuResources per process: each holds scratch memory and streams.
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    return _GPU_RESOURCES


def build_index(vectors: np.ndarray, ids: np.ndarray, spec: IndexSpec) -> faiss.Index:
    """Build and fill an inner-product index.

    Args:
        vectors: [n, d] float32 item vectors.
        ids: [n] int64 item ids stored with the vectors (search returns these).
        spec: which index.

    Returns:
        A searchable index (on the GPU when the spec allows and one is present), with
        ``nprobe`` / ``efSearch`` already applied.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if n == 0:
        raise ValueError("cannot build an index over zero vectors")
    spec = resolve(spec, n)
    index = faiss.index_factory(dim, _factory_string(spec, dim), faiss.METRIC_INNER_PRODUCT)
    if spec.kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efConstruction = spec.ef_construction
    index = _to_gpu(index, spec)
    if not index.is_trained:
        index.train(_training_sample(vectors, spec))
    index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
    configure(index, spec)
    return index


def resolve(spec: IndexSpec, n: int) -> IndexSpec:
    """Fill in catalogue-dependent defaults (``nlist``, ``nprobe``) and clamp to what ``n`` items allow."""
    if spec.kind in ("ivf", "ivfpq"):
        nlist = min(spec.nlist or auto_nlist(n), n)
        return replace(spec, nlist=nlist, nprobe=min(spec.nprobe or auto_nprobe(nlist), nlist))
    return spec


def _training_sample(vectors: np.ndarray, spec: IndexSpec) -> np.ndarray:
    # A fixed seed keeps rebuilds of the same catalogue identical.
    centroids = max(spec.nlist, 2**spec.nbits if spec.kind == "ivfpq" else 0)
    size = TRAIN_POINTS_PER_CELL * centroids
    if size >= len(vectors):
        return vectors
    rows = np.sort(np.random.default_rng(0).choice(len(vectors), size, replace=False))
    return vectors[rows]


def _factory_string(spec: IndexSpec, dim: int) -> str:
    if spec.kind == "flat":
        return "IDMap2,Flat"
    if spec.kind == "ivf":
        return f"IVF{spec.nlist},{IVF_CODES[spec.codes]}"
    if spec.kind == "ivfpq":
        if dim % spec.m:
            raise ValueError(f"ivfpq needs m dividing the dimension {dim}; got m={spec.m}")
        return f"IVF{spec.nlist},PQ{spec.m}x{spec.nbits}"
    return f"IDMap2,HNSW{spec.m}"


def _to_gpu(index: faiss.Index, spec: IndexSpec) -> faiss.Index:
    if spec.gpu == "never" or spec.kind == "hnsw" or not gpu_available():
        return index
    return faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)


def configure(index: faiss.Index, spec: IndexSpec) -> None:
    """Apply search-time parameters (``nprobe``, ``efSearch``) to a built or loaded index."""
    if spec.kind in ("ivf", "ivfpq"):
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = min(spec.nprobe or auto_nprobe(ivf.nlist), ivf.nlist)
    elif spec.kind == "hnsw":
        faiss.downcast_index(faiss.downcast_index(index).index).hnsw.efSearch = spec.ef_search


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k item ids and inner products; missing results have id -1. Returns ([q, k], [q, k])."""
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return ids, scores


def add_items(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, *, replace: bool = False) -> None:
    """Add item vectors to a built index without rebuilding it.

    IVF indexes file each new vector under its nearest existing cell; the cells are not
    retrained, so once new items are a large share of the catalogue (or drift away from
    it), rebuild instead. Flat and HNSW indexes add through their id map.

    Args:
        index: an index from :func:`build_index` or :func:`load_index`.
        vectors: [n, d] float32 item vectors.
        ids: [n] distinct int64 item ids.
        replace: when True, ids already in the index get the new vectors (other ids are
            simply added). That needs an index that can remove vectors: flat, ivf and
            ivfpq on the CPU; HNSW graphs and GPU indexes cannot. When False, an id
            already in the index is an error.

    Raises:
        ValueError: shapes disagree, ids repeat, or an id is already stored and ``replace`` is False.
        NotImplementedError: ``replace`` on an index that cannot remove vectors.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if vectors.ndim != 2 or vectors.shape[1] != index.d or ids.shape != (len(vectors),):
        raise ValueError(f"expected vectors [n, {index.d}] and ids [n], got {vectors.shape} and {ids.shape}")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("ids repeat within one add_items call")
    if replace:
        if not can_remove(index):
            raise NotImplementedError(f"{type(_base_index(index)).__name__} cannot remove vectors, so stored items cannot be replaced; rebuild the index instead")
        index.remove_ids(ids)
    else:
        stored = _stored_ids(index)
        if stored is not None and np.isin(ids, stored).any():
            raise ValueError(f"ids already in the index: {ids[np.isin(ids, stored)][:10].tolist()}; pass replace=True to change their vectors")
    index.add_with_ids(vectors, ids)


def _base_index(index: faiss.Index) -> faiss.Index:
    # The index under an id map, which decides what the whole index can do.
    index = faiss.downcast_index(index)
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index


def can_remove(index: faiss.Index) -> bool:
    """Whether vectors can be removed from ``index`` (flat, ivf and ivfpq on the CPU; not HNSW graphs or GPU indexes)."""
    base = _base_index(index)
    on_gpu = hasattr(faiss, "GpuIndex") and isinstance(base, faiss.GpuIndex)
    return not on_gpu and not isinstance(base, faiss.IndexHNSW)


def _stored_ids(index: faiss.Index) -> np.ndarray | None:
    # None where the ids cannot be listed without copying the index off the GPU.
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap):
        return faiss.vector_to_array(index.id_map)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    lists = ivf.invlists
    sizes = [lists.list_size(i) for i in range(ivf.nlist)]
    chunks = [faiss.rev_swig_ptr(lists.get_ids(i), size).copy() for i, size in enumerate(sizes) if size]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.int64)


def save_index(index: faiss.Index, path: str) -> None:
    """Write an index (GPU indexes are copied to the CPU first, so any host can load it)."""
    if gpu_available():
        # index_gpu_to_cpu copies GPU parts back and clones CPU-only indexes unchanged.
        index = faiss.index_gpu_to_cpu(index)
    faiss.write_index(index, path)


def load_index(path: str, spec: IndexSpec) -> faiss.Index:
    """Read an index written by :func:`save_index`, move it to a GPU if allowed, configure it."""
    index = _to_gpu(faiss.read_index(path), spec)
    configure(index, spec)
    return index
