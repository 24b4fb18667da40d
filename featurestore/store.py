"""The LanceDB feature store: connection, table names and the upsert, reject and index helpers every writer shares."""
from __future__ import annotations

import hashlib
import os
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.fs

from featurestore import objectstore

ITEMS = "items"
ITEM_REJECTS = "item_rejects"
INTERACTIONS = "interactions"
INTERACTION_REJECTS = "interaction_rejects"

DEFAULT_DB = os.environ.get("MMREC_DB", str(Path.cwd() / "lancedb"))

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("reject_key", pa.string(), nullable=False),
        pa.field("source", pa.string()),  # catalog / interaction file the row came from
        pa.field("row", pa.int64()),  # 0-based row number in that source
        pa.field("item_id", pa.string()),
        pa.field("stage", pa.string()),  # read | text | image | interaction ...
        pa.field("reason", pa.string()),
        pa.field("content_hash", pa.string()),  # what the row looked like: an unchanged row is not retried
        pa.field("recorded_at", pa.timestamp("us", tz="UTC")),
    ]
)


# Every vector column gets one kind of ANN index. Measured on 100k x 384 cosine vectors (bench/ann_query.py,
# bench/results/ann_query.md): HNSW-SQ searched with ef = 3k finds 98.8 % of the exact top 10 at 4.2 ms p50;
# IVF-PQ as LanceDB searches it by default finds 59 % (99 % only with refine_factor 10, at 8.3 ms).
ANN_EF_PER_RESULT = 3
INDEX_MIN_ROWS = 10_000  # below this, exact search is a few milliseconds and an ANN index only costs recall


def vector_index(metric: str):
    """The ANN index configuration for a vector column compared by `metric` (cosine, dot, l2)."""
    import lancedb

    return lancedb.index.HnswSq(distance_type=metric)


def ensure_indexes(table, vector_columns, metric: str, min_rows: int = INDEX_MIN_ROWS, scalar_columns=()) -> list[str]:
    """An ANN index (`vector_index(metric)`) on each vector column once it holds `min_rows` vectors, with a BTree
    on each scalar column queries filter by; later calls fold new rows into the indices. Returns the indexed
    vector columns."""
    import lancedb

    if table.count_rows() < min_rows:
        return []
    ready = [column for column in vector_columns if table.count_rows(f"{column} IS NOT NULL") >= min_rows]
    if not ready:
        return []
    indexed = {column for index in table.list_indices() for column in index.columns}
    if indexed:
        table.optimize()  # folds the rows added since into the existing indices
    for column in ready:
        if column not in indexed:
            table.create_index(column, config=vector_index(metric))
    for column in scalar_columns:
        if column not in indexed:
            table.create_index(column, config=lancedb.index.BTree())
    return ready


def nearest(query, k: int):
    """A LanceDB vector query limited to the k best rows, searching an HNSW index ANN_EF_PER_RESULT * k wide."""
    return query.ef(ANN_EF_PER_RESULT * k).limit(k)


class StoreError(RuntimeError):
    """A feature-store problem the user must fix (unreachable database, missing table...)."""


# The URI schemes Lance 14 has an object store for (its error for any other lists them).
URI_SCHEMES = ("s3", "s3+ddb", "gs", "az", "abfss", "oss", "cos", "goosefs", "hf", "file", "file+uring",
               "file-object-store", "memory", "shared-memory")


def check_uri(uri: str | None = None) -> str:
    """`uri` (default DEFAULT_DB), checked without LanceDB, so before Ray starts: a scheme Lance opens (an s3://
    bucket that the AWS environment's settings can read), or a local directory that exists or is created now.
    StoreError naming --db otherwise."""
    uri = uri or DEFAULT_DB
    if "://" in uri:
        scheme = uri.split("://", 1)[0].lower()
        if scheme not in URI_SCHEMES:
            raise StoreError(f"--db {uri!r}: LanceDB cannot open {scheme}:// URIs (only {', '.join(URI_SCHEMES)})")
        if (problem := objectstore.unusable_bucket(uri)) is not None:
            raise StoreError(f"--db {uri!r}: {problem}")
        return uri
    path = Path(uri)
    if path.exists() and not path.is_dir():
        raise StoreError(f"--db {uri!r} is a file, not a LanceDB directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"--db {uri!r}: cannot create the LanceDB directory ({e})") from e
    return uri


def connect(uri: str | None = None):
    """Open (or create) the LanceDB database at `uri`; fail at once with a clear message if it is unusable.

    An s3:// URI is opened with the standard AWS environment as storage options (featurestore.objectstore).
    """
    import lancedb  # imported late: drivers must import lance after ray.init()

    uri = check_uri(uri)
    try:
        db = lancedb.connect(uri, storage_options=objectstore.storage_options(uri) or None)
        db.list_tables()
    except Exception as e:  # noqa: BLE001 - any backend failure means the URI is unusable
        raise StoreError(f"cannot open LanceDB database {uri!r}: {e}") from e
    return db


def _listed(db) -> list[str]:
    result = db.list_tables()
    return list(getattr(result, "tables", result))


def table_uri(db, name: str) -> str:
    """Where table `name`'s Lance dataset lives: what Ray Data readers and Lance fragment writers are given."""
    return f"{str(db.uri).rstrip('/')}/{name}.lance"


def committed(db, name: str) -> bool:
    """Whether table `name`'s directory holds a committed version (a manifest in `_versions/`). A run killed while
    LanceDB created the table leaves a directory without one (a 0-byte `data/.tmp*` file): LanceDB lists it but
    cannot open it; the store treats it as absent, and the next create writes its first version into it."""
    fs, path = objectstore.filesystem(f"{table_uri(db, name)}/_versions")
    listing = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return any(info.base_name.endswith(".manifest") for info in listing)


def table_names(db) -> list[str]:
    """The tables of `db` that can be opened (without the directories of creates a kill interrupted)."""
    return [name for name in _listed(db) if committed(db, name)]


def open_table(db, name: str, required: bool = True):
    if name in _listed(db) and committed(db, name):
        return db.open_table(name)
    if required:
        raise StoreError(f"table {name!r} does not exist in {db.uri}; run the flow that creates it first")
    return None


def read_columns(db, name: str, columns: list[str] | None = None, where: str | None = None) -> pa.Table:
    """Only the named columns of a table (embeddings are large: never read them by accident)."""
    return open_table(db, name).to_lance().to_table(columns=columns, filter=where)


def sql_string(value) -> str:
    """A string literal for a LanceDB filter."""
    return "'" + str(value).replace("'", "''") + "'"


def upsert(db, name: str, data: pa.Table | pa.RecordBatchReader, key: str | list[str], replaces: str | None = None):
    """Insert `data` into table `name`, replacing rows whose `key` matches; creates the table on first write.
    `data` may be a stream (a RecordBatchReader, such as another table's scan): Lance consumes it batch by batch.
    `replaces`: a filter of the rows `data` stands for as a whole; those it does not hold are deleted in the
    same commit.

    A null vector is a valid value here (an item without an image); LanceDB's default treats it as "bad".
    """
    table = open_table(db, name, required=False)
    if table is None:
        return db.create_table(name, data=data, schema=data.schema, on_bad_vectors="null")
    if isinstance(data, pa.RecordBatchReader) or data.num_rows or replaces:
        merge = table.merge_insert(key).when_matched_update_all().when_not_matched_insert_all()
        if replaces:
            merge = merge.when_not_matched_by_source_delete(replaces)
        merge.execute(data, on_bad_vectors="null")
    return table


def ensure_table(db, name: str, schema: pa.Schema):
    """Table `name`, created empty where it is missing. A table that processes write at once (the `runs` of a
    sweep's trials) is created so before they start: Lance commits a creation as an overwrite, and one that
    races another process's first rows can erase them. Two creations racing each other leave one table."""
    table = open_table(db, name, required=False)
    if table is not None:
        return table
    try:
        return db.create_table(name, schema=schema)
    except (ValueError, OSError, RuntimeError):  # "already exists", or a commit conflict with the other creation
        table = open_table(db, name, required=False)
        if table is None:  # no race lost: the creation itself failed
            raise
        return table


def add_missing_fields(db, name: str, schema: pa.Schema) -> None:
    """Give table `name` (if it exists) the fields of `schema` it lacks, null in its rows: a record table written
    before a field existed takes rows that have it."""
    table = open_table(db, name, required=False)
    missing = [] if table is None else [field for field in schema if field.name not in table.schema.names]
    if missing:
        table.add_columns(missing)


def delete_matching(table, keys: pa.RecordBatchReader, on: list[str]) -> None:
    """Delete the rows of `table` whose `on` columns equal a row of `keys` (a stream), in one commit."""
    table.to_lance().merge_insert(on).when_matched_delete().execute(keys)


def reject_key(*parts) -> str:
    return hashlib.sha1("\x1f".join("" if p is None else str(p) for p in parts).encode()).hexdigest()


def rejects_table(records: list[dict]) -> pa.Table:
    """Reject records (source, row, item_id, stage, reason) as an Arrow table keyed so re-runs do not duplicate them."""
    now = datetime.now(timezone.utc)
    rows = [
        {
            "reject_key": reject_key(r.get("source"), r.get("row"), r.get("item_id"), r["stage"]),
            "source": r.get("source"),
            "row": r.get("row"),
            "item_id": r.get("item_id"),
            "stage": r["stage"],
            "reason": r["reason"],
            "content_hash": r.get("content_hash"),
            "recorded_at": now,
        }
        for r in records
    ]
    return pa.Table.from_pylist(rows, schema=REJECTS_SCHEMA)


def record_rejects(db, name: str, records: list[dict]) -> int:
    """Upsert reject records into table `name` (item_rejects / interaction_rejects). Returns how many were given."""
    if records:
        upsert(db, name, rejects_table(records), "reject_key")
    return len(records)
