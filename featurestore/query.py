"""Looking up item embeddings and nearest items in the feature store (returns pandas DataFrames)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from featurestore import store

MODALITIES = {"text": "text_emb", "image": "image_emb"}
SHOWN_COLUMNS = ["item_id", "text", "categories", "image_ref"]


def _sql_list(ids) -> str:
    return ", ".join(store.sql_string(i) for i in ids)


def get_embeddings(db, ids, table: str = store.ITEMS, columns=("text_emb", "image_emb")) -> pd.DataFrame:
    """Rows of `table` for `ids`, in the order asked; an unknown id raises KeyError naming it."""
    ids = [str(i) for i in ids]
    data = store.open_table(db, table).search().where(f"item_id IN ({_sql_list(ids)})").select(
        ["item_id", "text", *columns]
    ).limit(len(ids)).to_pandas()
    missing = [i for i in ids if i not in set(data["item_id"])]
    if missing:
        raise KeyError(f"item id(s) not in table {table!r}: {', '.join(missing[:10])}")
    return data.set_index("item_id").loc[ids].reset_index()


def _vector(value) -> np.ndarray | None:
    """A stored embedding cell as a float32 vector; None for a null (an item without that modality)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return np.asarray(value, dtype=np.float32)


def _search(table, vector: np.ndarray, column: str, k: int, exclude: str | None) -> pd.DataFrame:
    query = table.search(vector, vector_column_name=column).distance_type("cosine").select([*SHOWN_COLUMNS, "_distance"])
    if exclude is not None:
        query = query.where(f"item_id != {_sql_list([exclude])}", prefilter=True)
    result = store.nearest(query, k).to_pandas()
    return result.assign(similarity=1.0 - result.pop("_distance"))


def similar_items(
    db,
    item_id: str | None = None,
    text: str | None = None,
    by: str = "text",
    k: int = 10,
    table: str = store.ITEMS,
    text_encoder=None,
) -> pd.DataFrame:
    """Nearest items to an item (by its text, image or both embeddings) or to a free-text query.

    `by="both"` ranks by the sum of text and image cosine similarities over the union of both neighbour lists
    (an item without an image contributes its text similarity only). A text query is embedded with the same
    text encoder that filled the table (or `text_encoder`, an already loaded one).
    """
    if (item_id is None) == (text is None):
        raise ValueError("give exactly one of item_id or text")
    if by not in (*MODALITIES, "both"):
        raise ValueError(f"by must be 'text', 'image' or 'both', got {by!r}")
    items = store.open_table(db, table)
    if text is not None:
        if by != "text":
            raise ValueError("a text query searches the text embeddings: use by='text'")
        return _search(items, _embed_query(items, text, text_encoder), "text_emb", k, None)
    anchor = get_embeddings(db, [item_id], table).iloc[0]
    modalities = list(MODALITIES) if by == "both" else [by]
    results = []
    for modality in modalities:
        vector = _vector(anchor[MODALITIES[modality]])
        if vector is None:
            if by != "both":
                raise ValueError(f"item {item_id!r} has no {modality} embedding")
            continue
        found = _search(items, vector, MODALITIES[modality], k, str(item_id))
        results.append(found.rename(columns={"similarity": f"{modality}_similarity"}))
    if len(results) == 1:
        return results[0].rename(columns={results[0].columns[-1]: "similarity"})
    return _fuse(db, table, anchor, results, k)


def _fuse(db, table: str, anchor: pd.Series, results: list[pd.DataFrame], k: int) -> pd.DataFrame:
    """Exact text+image similarity for the union of both neighbour lists."""
    candidates = pd.concat(results)[SHOWN_COLUMNS].drop_duplicates("item_id")
    vectors = get_embeddings(db, candidates["item_id"], table)
    for modality, column in MODALITIES.items():
        mine = _vector(anchor[column])
        theirs = [_vector(v) for v in vectors[column]]
        candidates[f"{modality}_similarity"] = [
            float(mine @ v) if mine is not None and v is not None else 0.0 for v in theirs
        ]
    candidates["similarity"] = candidates["text_similarity"] + candidates["image_similarity"]
    return candidates.sort_values("similarity", ascending=False).head(k).reset_index(drop=True)


def _embed_query(items, text: str, text_encoder=None) -> np.ndarray:
    if text_encoder is None:
        from encoders import create_encoder

        names = items.search().select(["text_encoder"]).where("text_emb IS NOT NULL").limit(1).to_pandas()
        if names.empty:
            raise ValueError("the table has no text embeddings to search")
        text_encoder = create_encoder(names["text_encoder"].iloc[0], "text")
    return text_encoder.encode([text])[0]
