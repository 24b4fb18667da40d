"""The encode flow over catalogs of several files and on object storage: a folder of Parquet files, an s3://
catalog whose relative image references resolve against its prefix, and the store on the same bucket."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import pytest

from featurestore import store
from featurestore.encode import encode_catalog
from featurestore.query import get_embeddings

pytestmark = pytest.mark.e2e


def rejects_by_item(db) -> dict:
    table = store.read_columns(db, store.ITEM_REJECTS, ["item_id", "source", "row", "stage", "reason"])
    return {(r["item_id"] or f"{r['source']}:{r['row']}"): r for r in table.to_pylist()}


def test_a_folder_of_parquet_files_first_row_of_an_id_wins(ray_local, tmp_path):
    folder = tmp_path / "catalog"
    folder.mkdir()
    parts = [
        {"item_id": ["a", "b", "c"], "title": ["Alpha", "Bravo", "Charlie"]},
        {"item_id": ["d", "b", None], "title": ["Delta", "Bravo again", "no id"]},
        {"item_id": ["e", "a"], "title": ["Echo", "Alpha again"]},
    ]
    for i, part in enumerate(parts):
        pq.write_table(pa.table(part), folder / f"part-{i}.parquet")
    (folder / "_SUCCESS").write_text("")
    db_uri = str(tmp_path / "db")
    summary = encode_catalog(str(folder), db_uri=db_uri, batch_size=4)
    assert (summary.input, summary.encoded, summary.rejected_whole) == (8, 5, 3)
    db = store.connect(db_uri)
    texts = dict(zip(*store.read_columns(db, "items", ["item_id", "text"]).to_pydict().values()))
    assert texts == {"a": "Alpha", "b": "Bravo", "c": "Charlie", "d": "Delta", "e": "Echo"}  # the first rows won
    rejects = rejects_by_item(db)
    assert rejects["b"]["reason"] == f"item_id 'b' repeats row 1 of {folder / 'part-0.parquet'}"
    assert (rejects["b"]["source"], rejects["b"]["row"]) == (str(folder / "part-1.parquet"), 1)
    assert rejects["a"]["reason"] == f"item_id 'a' repeats row 0 of {folder / 'part-0.parquet'}"
    assert rejects[f"{folder / 'part-1.parquet'}:2"]["reason"] == "missing item_id"
    assert set(summary.phases) >= {"recover", "stream", "commit", "merge", "index"}
    assert store.table_names(db) == sorted(["items", store.ITEM_REJECTS])  # no staging table left behind


def test_an_s3_catalog_with_its_images_and_the_store_on_the_same_bucket(s3, ray_local, sample_catalog):
    """The workers were started without the AWS environment: the catalog reader, the image fetch and the writers
    get the driver's settings."""
    import ray

    assert ray.get(ray.remote(lambda: __import__("os").environ.get("AWS_ENDPOINT_URL")).remote()) is None
    fs = s3.filesystem()
    prefix = f"{s3.bucket}/catalogs/photos"
    photo = (sample_catalog.parent / "images" / "chelsea.jpg").read_bytes()
    with fs.open_output_stream(f"{prefix}/images/chelsea.jpg") as f:
        f.write(photo)
    with fs.open_output_stream(f"{s3.bucket}/catalogs/outside.jpg") as f:
        f.write(photo)
    rows = [{"item_id": "cat", "title": "A cat", "image": "images/chelsea.jpg"},
            {"item_id": "escape", "title": "Outside the prefix", "image": "../outside.jpg"},
            {"item_id": "gone", "title": "No such object", "image": "images/nope.jpg"}]
    with fs.open_output_stream(f"{prefix}/items.jsonl") as f:
        f.write(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + b"\xff not a line\n")
    db_uri = f"s3://{s3.bucket}/store-from-s3-catalog"
    summary = encode_catalog(f"s3://{prefix}/items.jsonl", db_uri=db_uri, batch_size=4)
    assert (summary.input, summary.encoded, summary.image_failures, summary.rejected_whole) == (4, 3, 2, 1)
    db = store.connect(db_uri)
    cat = get_embeddings(db, ["cat"], columns=("image_ref", "image_emb")).iloc[0]
    assert cat["image_ref"] == f"s3://{prefix}/images/chelsea.jpg"  # resolved against the catalog's prefix
    assert np.linalg.norm(cat["image_emb"]) == pytest.approx(1.0, abs=1e-5)
    rejects = rejects_by_item(db)
    assert rejects["escape"]["reason"].startswith("refused by the image-root rule")
    assert rejects["gone"]["reason"].startswith(f"no object at s3://{prefix}/images/nope.jpg")
    assert rejects[f"s3://{prefix}/items.jsonl:4"]["reason"].startswith("line 4 is not valid UTF-8")
    listed = fs.get_file_info(pyarrow.fs.FileSelector(f"{s3.bucket}/store-from-s3-catalog", recursive=True))
    assert any("/items.lance/data/" in info.path for info in listed)
    again = encode_catalog(f"s3://{prefix}/items.jsonl", db_uri=db_uri, batch_size=4)
    assert (again.encoded, again.unchanged) == (0, 3)
