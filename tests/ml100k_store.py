"""A real ML-100k store for the training and sweep tests: the shipped items and interactions, and random
(seeded) unit text vectors instead of encoder outputs (the encoders have their own tests)."""
import numpy as np
import pyarrow as pa

from featurestore import movielens, store
from featurestore.encode import items_schema
from training.data import ensure_dataset


def write_items(db, text_dim: int, categories: bool = True) -> None:
    """ML-100k's items with random unit text vectors (seeded) of width text_dim; their genres as categories
    unless told otherwise."""
    items = movielens.load_items("ml-100k")
    vectors = np.random.default_rng(0).normal(size=(len(items), text_dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    schema = items_schema(text_dim, 8)
    given = {"item_id": items["item_id"].tolist(), "text": items["title"].tolist(),
             "categories": items["genres"].tolist() if categories else [[] for _ in range(len(items))],
             "text_emb": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), text_dim)}
    columns = [given.get(f.name, pa.nulls(len(items), f.type)) for f in schema]
    db.create_table(store.ITEMS, data=pa.table(columns, schema=schema), mode="overwrite")


def build_ml100k_store(path: str, text_dim: int, categories: bool = True):
    """The store at `path`: those items, then the interactions imported and the sequences built."""
    db = store.connect(path)
    write_items(db, text_dim, categories)
    ensure_dataset(db, "ml-100k")
    return db
