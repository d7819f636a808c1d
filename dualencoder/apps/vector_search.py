"""Nearest neighbours by inner product over normalised embeddings: faiss when installed, else NumPy.

Both backends answer the same two calls, `search(vectors).top(queries, k)` returning
`(scores [Q, k], rows [Q, k])`, best first, so the apps never know which one runs. The embeddings
themselves are stored by the index as a NumPy file; a backend is an in-memory view built from them,
so an index made where faiss is installed is searched where it is not.
"""

from __future__ import annotations

import numpy as np

BACKENDS = ("auto", "faiss", "numpy")


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class NumpySearch:
    """Exact search by one matrix product: fine up to a few hundred thousand photos."""

    name = "numpy"

    def __init__(self, vectors: np.ndarray):
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)

    def top(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(self.vectors))
        scores = np.asarray(queries, np.float32) @ self.vectors.T
        rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, rows, axis=1), rows


class FaissSearch:
    """Exact search with faiss's flat inner-product index (multi-threaded, SIMD)."""

    name = "faiss"

    def __init__(self, vectors: np.ndarray):
        import faiss

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)

    def top(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.index.ntotal)
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, rows


def build_search(vectors: np.ndarray, backend: str = "auto"):
    """A search over `vectors` [N, D] with `backend`: "faiss", "numpy", or "auto" (faiss when installed)."""
    if backend not in BACKENDS:
        raise SystemExit(f"--search {backend}: expected one of {', '.join(BACKENDS)}")
    if backend == "faiss" and not faiss_available():
        raise SystemExit("--search faiss: faiss is not installed (pip install faiss-cpu), or use --search numpy")
    if backend == "faiss" or (backend == "auto" and faiss_available()):
        return FaissSearch(vectors)
    return NumpySearch(vectors)
