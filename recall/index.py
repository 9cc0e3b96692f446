"""One FAISS index factory for item vectors: exact Flat, IVF, IVF-PQ and HNSW, on GPU or CPU.

Every index searches by inner product, the similarity the towers trained on, and
stores item ids (not row numbers) so new items can be added without a rebuild.
A spec is written as a short string, e.g. ``flat``, ``ivf:nlist=1024,nprobe=32``,
``ivfpq:nlist=1024,m=16,nprobe=32`` or ``hnsw:m=32,ef_search=128``.
"""

import math
from dataclasses import asdict, dataclass, fields, replace

import faiss
import numpy as np

KINDS = ("flat", "ivf", "ivfpq", "hnsw")


@dataclass(frozen=True)
class IndexSpec:
    """What index to build; ``0`` for ``nlist`` means "pick from the catalogue size".

    Attributes:
        kind: one of :data:`KINDS`.
        nlist: IVF cells.
        nprobe: IVF cells visited per query.
        m: PQ sub-quantisers (ivfpq) or graph degree (hnsw).
        nbits: bits per PQ code.
        ef_search, ef_construction: HNSW search / build breadth.
        gpu: ``"auto"`` uses a GPU when faiss sees one, ``"never"`` forces the CPU.
    """

    kind: str = "flat"
    nlist: int = 0
    nprobe: int = 16
    m: int = 32
    nbits: int = 8
    ef_search: int = 128
    ef_construction: int = 200
    gpu: str = "auto"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown index kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.gpu not in ("auto", "never"):
            raise ValueError(f"gpu must be 'auto' or 'never', not {self.gpu!r}")
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
                values[key] = value if key == "gpu" else int(value)
            except ValueError:
                raise ValueError(f"index option {key} needs an integer, got {value!r}") from None
        return cls(kind=kind, **values)

    def __str__(self) -> str:
        default = IndexSpec(kind=self.kind)
        opts = [f"{k}={v}" for k, v in asdict(self).items() if k != "kind" and v != getattr(default, k)]
        return self.kind + (":" + ",".join(opts) if opts else "")

    def to_dict(self) -> dict:
        return asdict(self)


def auto_nlist(n: int) -> int:
    """About 4·√n cells, but never fewer than 39 training points per cell."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


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
        index.train(vectors)
    index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
    configure(index, spec)
    return index


def resolve(spec: IndexSpec, n: int) -> IndexSpec:
    """Fill in catalogue-dependent defaults (``nlist``) and clamp to what ``n`` items allow."""
    if spec.kind in ("ivf", "ivfpq"):
        nlist = min(spec.nlist or auto_nlist(n), n)
        return replace(spec, nlist=nlist, nprobe=min(spec.nprobe, nlist))
    return spec


def _factory_string(spec: IndexSpec, dim: int) -> str:
    if spec.kind == "flat":
        return "IDMap2,Flat"
    if spec.kind == "ivf":
        return f"IVF{spec.nlist},Flat"
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
        faiss.extract_index_ivf(index).nprobe = spec.nprobe
    elif spec.kind == "hnsw":
        faiss.downcast_index(faiss.downcast_index(index).index).hnsw.efSearch = spec.ef_search


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k item ids and inner products; missing results have id -1. Returns ([q, k], [q, k])."""
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return ids, scores


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
