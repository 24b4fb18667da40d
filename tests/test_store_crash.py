"""A table directory that a killed create left behind (no committed version) is absent to the store; real tables never are."""
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pytest

from featurestore import objectstore, store


def rows(ids, value):
    return pa.table({"item_id": pa.array(ids, pa.string()), "value": pa.array([value] * len(ids), pa.int64())})


def wedge(db_uri: str, name: str, versions_folder: bool) -> None:
    """What `kill -9` during LanceDB's first write of a table leaves: a 0-byte temp data file, no manifest."""
    fs, root = objectstore.filesystem(f"{db_uri}/{name}.lance")
    fs.create_dir(f"{root}/data")
    with fs.open_output_stream(f"{root}/data/.tmpk3Jq9Z"):
        pass
    if versions_folder:
        fs.create_dir(f"{root}/_versions")


@pytest.fixture(params=["local", "s3"])
def db_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "db")
    return f"s3://{request.getfixturevalue('s3').bucket}/{tmp_path.name}"


@pytest.mark.parametrize("versions_folder", [False, True], ids=["no-_versions", "empty-_versions"])
def test_a_wedged_table_is_absent_and_the_next_upsert_creates_it(db_uri, versions_folder):
    db = store.connect(db_uri)
    store.upsert(db, "kept", rows(["k"], 0), "item_id")
    wedge(db_uri, "items", versions_folder)
    assert "items" in db.list_tables().tables  # LanceDB itself lists it...
    with pytest.raises(ValueError, match="not found"):
        db.open_table("items")  # ...and cannot open it

    assert store.table_names(db) == ["kept"]
    assert store.open_table(db, "items", required=False) is None
    with pytest.raises(store.StoreError, match="table 'items' does not exist"):
        store.open_table(db, "items")

    store.upsert(db, "items", rows(["a", "b"], 1), "item_id")
    store.upsert(db, "items", rows(["b", "c"], 2), "item_id")  # the merge path on the repaired table
    reopened = store.connect(db_uri)
    assert sorted(store.table_names(reopened)) == ["items", "kept"]
    got = store.read_columns(reopened, "items").sort_by("item_id").to_pydict()
    assert got == {"item_id": ["a", "b", "c"], "value": [1, 2, 2]}
    assert store.read_columns(reopened, "kept").to_pydict() == {"item_id": ["k"], "value": [0]}


@pytest.mark.filterwarnings("ignore:optimize.cleanup_older_than=0.")
def test_a_real_table_is_never_taken_for_a_wedged_one(tmp_path):
    """A table with a stray temp file (a later write killed), many versions, and old versions cleaned up."""
    db_uri = str(tmp_path / "db")
    db = store.connect(db_uri)
    table = store.upsert(db, "items", rows(["a"], 1), "item_id")
    for value in range(2, 6):
        store.upsert(db, "items", rows(["a", f"n{value}"], value), "item_id")
    table.optimize(cleanup_older_than=timedelta(0))
    (Path(db_uri) / "items.lance" / "data" / ".tmpStray1").touch()

    assert store.table_names(db) == ["items"]
    opened = store.open_table(db, "items", required=False)
    assert opened is not None and opened.count_rows() == 5
    store.upsert(db, "items", rows(["a"], 9), "item_id")  # merges into it: never re-created over it
    got = dict(zip(*store.read_columns(db, "items").to_pydict().values()))
    assert got == {"a": 9, "n2": 2, "n3": 3, "n4": 4, "n5": 5}
