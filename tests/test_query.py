"""Nearest-item queries through the ANN index the encoding flow builds (real LanceDB, no Ray)."""
import lancedb
import numpy as np
import pyarrow as pa

from featurestore.encode import ensure_indexes, items_schema
from featurestore.query import similar_items

TEXT_DIM, IMAGE_DIM, ROWS, K = 32, 8, 3000, 10


def clustered_unit_vectors(rows: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    centres = rng.normal(size=(40, dim))
    vectors = centres[rng.integers(0, 40, rows)] + 0.5 * rng.normal(size=(rows, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def test_indexed_search_finds_what_exact_search_finds(tmp_path):
    rng = np.random.default_rng(0)
    vectors = clustered_unit_vectors(ROWS, TEXT_DIM, rng)
    ids = [f"item{i}" for i in range(ROWS)]
    schema = items_schema(TEXT_DIM, IMAGE_DIM)
    columns = {field.name: pa.nulls(ROWS, field.type) for field in schema}
    columns["item_id"] = pa.array(ids)
    columns["text_emb"] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), TEXT_DIM)
    db = lancedb.connect(tmp_path / "db")
    table = db.create_table("items", pa.table(columns, schema=schema))

    assert ensure_indexes(table, min_rows=ROWS + 1) == []  # small tables are searched exactly
    assert ensure_indexes(table, min_rows=1000) == ["text_emb"]  # no image vectors: no image index
    indices = {index.columns[0]: str(index.index_type).upper() for index in table.list_indices()}
    assert set(indices) == {"text_emb", "item_id"}  # and a BTree on item_id, for lookups by id
    assert "HNSW" in indices["text_emb"] and "BTREE" in indices["item_id"]

    recalls = []
    for anchor in rng.choice(ROWS, 20, replace=False):
        similarity = vectors @ vectors[anchor]
        similarity[anchor] = -np.inf  # the anchor itself is excluded
        exact = {ids[i] for i in np.argsort(-similarity)[:K]}
        found = similar_items(db, item_id=ids[anchor], by="text", k=K)
        assert len(found) == K and ids[anchor] not in set(found["item_id"])
        assert np.all(np.diff(found["similarity"].to_numpy()) <= 1e-6)  # best first
        recalls.append(len(exact & set(found["item_id"])) / K)
    assert np.mean(recalls) >= 0.95, recalls
