"""One model's embeddings read back from the lake a chunk at a time, for indexes larger
than memory (a `dataengine.index.VectorSource`).

Selecting is one DuckDB query that returns no vectors: the newest embedding of each key
(as `embed.load_vectors` picks it) as a part file and a row in it. Reading walks the part
files in name order and decodes only the row groups that hold selected rows, so memory
holds one row group and one chunk, not the matrix. Rows come in (file, row) order, not
key order: an index keeps its own id map.

    source = LakeVectors(Catalog(ws), model_id, "image", splits=["train"])
    built = build_index(source, None, model_id, IndexConfig(memory_budget_mb=2048))
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dataengine import lake
from dataengine.catalog import Catalog
from dataengine.embed import vector_filter


class LakeVectors:
    """The vectors of one model and kind (optionally of some splits or sources), keyed."""

    def __init__(self, catalog: Catalog, model_id: str, kind: str, splits: Sequence[str] | None = None,
                 sources: Sequence[str] | None = None, without_patched: bool = False):
        glob = lake.table_glob(catalog.ws.lake, "embeddings").replace("'", "''")
        where, params = vector_filter(model_id, kind, splits, sources, without_patched)
        t = catalog.query(
            "SELECT e.key, e.filename AS file, e.file_row_number AS row, len(e.vector) AS d "
            f"FROM read_parquet('{glob}', union_by_name = true, filename = true, file_row_number = true) e "
            f"JOIN samples s USING (key) WHERE {where} "
            "QUALIFY row_number() OVER (PARTITION BY e.key ORDER BY e.created_at DESC) = 1", params)
        self.model_id, self.kind = model_id, kind
        files = pc.dictionary_encode(t["file"].combine_chunks())
        names = files.dictionary.to_pylist()
        # Files by name, rows in file order: each part is then read front to back once.
        rank = np.argsort(np.argsort(names)) if names else np.zeros(0, np.int64)
        file_ix = rank[files.indices.to_numpy(zero_copy_only=False)] if len(t) else np.zeros(0, np.int64)
        row = t["row"].to_numpy().astype(np.int64)
        order = np.lexsort((row, file_ix))
        self.keys = np.asarray(t["key"].to_pylist(), dtype=object)[order]
        self._files = sorted(names)
        self._file = file_ix[order].astype(np.int32)
        self._row = row[order]
        widths = np.unique(t["d"].to_numpy()) if len(t) else np.array([0])
        if len(widths) > 1:
            raise ValueError(f"embeddings of {model_id!r} ({kind}) have mixed widths {widths.tolist()}")
        self.dim = int(widths[0])

    def __len__(self) -> int:
        return len(self.keys)

    def select(self, keep: np.ndarray) -> "LakeVectors":
        """The same source restricted to the rows where `keep` (a bool mask) is true."""
        out = object.__new__(LakeVectors)
        out.__dict__.update(self.__dict__)
        out.keys, out._file, out._row = self.keys[keep], self._file[keep], self._row[keep]
        return out

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        """(m <= rows, dim) float16 vectors in row order."""
        pending: list[np.ndarray] = []
        held = 0
        bounds = np.searchsorted(self._file, np.arange(len(self._files) + 1))  # rows are sorted by file
        for f in range(len(self._files)):
            want = self._row[bounds[f] : bounds[f + 1]]  # sorted
            if not len(want):
                continue
            part = pq.ParquetFile(self._files[f])
            first = 0
            for g in range(part.metadata.num_row_groups):
                size = part.metadata.row_group(g).num_rows
                a, b = np.searchsorted(want, [first, first + size])
                if b > a:
                    col = part.read_row_group(g, columns=["vector"]).column("vector")
                    picked = col.take(pa.array(want[a:b] - first)).combine_chunks()
                    flat = picked.flatten().to_numpy(zero_copy_only=False)
                    vecs = flat.reshape(b - a, self.dim)
                    for s in range(0, len(vecs), rows):
                        pending.append(vecs[s : s + rows])
                        held += len(pending[-1])
                        while held >= rows:
                            out, pending, held = _take(pending, rows)
                            yield out
                first += size
        if held:
            yield np.concatenate(pending)


def _take(pending: list[np.ndarray], rows: int) -> tuple[np.ndarray, list[np.ndarray], int]:
    """The first `rows` rows of the pending pieces, and what is left."""
    allp = np.concatenate(pending)
    rest = allp[rows:]
    return allp[:rows], ([rest] if len(rest) else []), len(rest)
