"""Interaction import, sequences, leave-one-out examples and item features, on real LanceDB tables."""
import json
import runpy
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featurestore import movielens, store
from featurestore.catalogs import read_catalog
from featurestore.interactions import InteractionSourceError, import_interactions, kcore_mask, parse_timestamps
from featurestore.sequences import (
    ItemIndex,
    build_sequences,
    category_labels,
    load_item_features,
    make_examples,
    max_gap_s,
    read_sequences,
    split_counts,
    user_key_of,
)
from recmodels.hm4sr import n_intervals_for

REPO = Path(__file__).resolve().parents[1]
TEXT_DIM, IMAGE_DIM = 4, 3


def items_table(item_ids, categories=None, image_missing=(), with_image=True) -> pa.Table:
    """The encoding flow's `items` schema; item k of `item_ids` gets text_emb = k + [0, .1, .2, .3] and
    image_emb = -k - [0, .1, .2] (null for `image_missing`), so rows can be traced back to their ids."""
    n = len(item_ids)
    base = np.arange(n, dtype=np.float32)[:, None]
    text = base + np.arange(TEXT_DIM, dtype=np.float32) / 10
    image = -base - np.arange(IMAGE_DIM, dtype=np.float32) / 10
    no_image = pa.array([i in set(image_missing) for i in item_ids])
    columns = {
        "item_id": pa.array(item_ids, pa.string()),
        "text": pa.array([f"text {i}" for i in item_ids]),
        "categories": pa.array(categories or [[] for _ in item_ids], pa.list_(pa.string())),
        "image_ref": pa.array([None] * n, pa.string()),
        "content_hash": pa.array(["h"] * n),
        "text_emb": pa.FixedSizeListArray.from_arrays(pa.array(text.ravel()), TEXT_DIM),
        "image_emb": pa.FixedSizeListArray.from_arrays(pa.array(image.ravel()), IMAGE_DIM, mask=no_image),
        "text_encoder": pa.array(["t"] * n),
        "text_encoder_version": pa.array(["1"] * n),
        "image_encoder": pa.array(["i"] * n),
        "image_encoder_version": pa.array(["1"] * n),
        "encoded_at": pa.array([datetime.now(timezone.utc)] * n, pa.timestamp("us", tz="UTC")),
    }
    if not with_image:
        del columns["image_emb"]
    return pa.table(columns)


def new_db(path, item_ids, **kwargs):
    db = store.connect(str(path))
    db.create_table(store.ITEMS, data=items_table(item_ids, **kwargs))
    return db


def rejects(db) -> pd.DataFrame:
    return store.open_table(db, store.INTERACTION_REJECTS).to_pandas().sort_values("row").reset_index(drop=True)


def stored(db) -> pd.DataFrame:
    return store.open_table(db, store.INTERACTIONS).to_pandas().sort_values("row").reset_index(drop=True)


def adds_up(summary) -> bool:
    return summary.input_rows == summary.imported + sum(summary.rejected.values()) + summary.kcore_dropped


# ---------------------------------------------------------------- MovieLens-100k end to end


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory):
    items = movielens.load_items("ml-100k")
    db = new_db(tmp_path_factory.mktemp("ml100k"), items["item_id"].tolist(), categories=items["genres"].tolist())
    summary = import_interactions(db, "ml-100k")
    return db, summary, build_sequences(db)


def test_ml100k_import_counts(ml100k):
    db, summary, seqs = ml100k
    assert summary.input_rows == summary.imported == 100_000 and adds_up(summary)
    assert summary.timestamp_format == "seconds"
    assert (seqs.users, seqs.interactions, seqs.short_users) == (943, 100_000, 0)


def test_ml100k_leave_one_out_matches_a_stable_chronological_sort(ml100k):
    db, _, seqs = ml100k
    truth = movielens.load_interactions("ml-100k")
    truth["row"] = np.arange(len(truth))
    truth = truth.sort_values(["user_id", "timestamp", "row"], kind="stable")
    last = truth.groupby("user_id").nth(-1).set_index("user_id")
    second = truth.groupby("user_id").nth(-2).set_index("user_id")
    t0 = truth["timestamp"].min()
    assert seqs.first_timestamp == t0

    rows = read_sequences(db)
    users = np.array(rows.column("user_id").to_pylist())
    index = ItemIndex.from_db(db)
    test = make_examples(rows, "test", max_len=2000)
    valid = make_examples(rows, "valid", max_len=2000)
    assert list(index.item_ids(test["target"])) == list(last.loc[users, "item_id"])
    assert list(index.item_ids(valid["target"])) == list(second.loc[users, "item_id"])

    lengths = truth.groupby("user_id").size().loc[users].to_numpy()
    assert (test["seq_len"] == lengths - 1).all() and (valid["seq_len"] == lengths - 2).all()
    # relative times: padding is 0, real positions are non-decreasing and equal timestamp - t0
    real = np.arange(test["time_seq"].shape[1])[None, :] < test["seq_len"][:, None]
    assert (test["time_seq"][~real] == 0).all() and (test["item_seq"][~real] == 0).all()
    assert all((np.diff(t[:n]) >= 0).all() for t, n in zip(test["time_seq"], test["seq_len"]))
    first_user = truth[truth["user_id"] == users[0]]
    assert list(test["time_seq"][0, : test["seq_len"][0]]) == list(first_user["timestamp"].iloc[:-1] - t0)
    assert list(index.item_ids(test["item_seq"][0, : test["seq_len"][0]])) == list(first_user["item_id"].iloc[:-1])


def test_category_labels_for_ml100k_genres():
    items = movielens.load_items("ml-100k")
    index = ItemIndex(items["item_id"])
    vocab, labels = category_labels(items["item_id"], items["genres"], index)
    assert len(vocab) == 19 and vocab == sorted(vocab) and labels.shape == (1683, 19) and labels.dtype == np.float32
    toy_story = labels[index.lookup(["1"])[0]]
    assert [vocab[c] for c in np.flatnonzero(toy_story)] == ["Animation", "Children's", "Comedy"]
    assert not labels[0].any()
    assert (labels[1:].sum(axis=1) >= 1).all()


# ---------------------------------------------------------------- sources, timestamps, rejects


def test_parse_timestamps_detects_the_unit_once_per_file():
    seconds, ok, fmt = parse_timestamps(pd.Series(["1700000000", "1700000001", " ", "x"]))
    assert fmt == "seconds" and list(ok) == [True, True, False, False] and list(seconds[:2]) == [1700000000, 1700000001]
    seconds, ok, fmt = parse_timestamps(pd.Series([1700000000123, 1700000001999]))
    assert fmt == "milliseconds" and list(seconds) == [1700000000, 1700000001]
    seconds, ok, fmt = parse_timestamps(pd.Series(["2023-11-14T22:13:20Z", "2023-11-14T23:13:20+01:00", "2023-11-14", "1700000000", "soon"]))
    assert fmt == "ISO-8601" and list(ok) == [True, True, True, False, False]
    assert list(seconds[:3]) == [1700000000, 1700000000, 1699920000]
    seconds, ok, fmt = parse_timestamps(pd.Series(pd.to_datetime(["2023-11-14T22:13:20"])))
    assert fmt == "timestamp" and list(seconds) == [1700000000]


def write_source(path: Path, kind: str, rows: list[dict]) -> Path:
    frame = pd.DataFrame(rows)
    if kind == "csv":
        frame.to_csv(path, index=False)
    elif kind == "parquet":
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
    else:
        with pa.output_stream(str(path), compression="detect") as out:  # gzip for a .gz name
            out.write("".join(json.dumps(r) + "\n" for r in rows).encode())
    return path


@pytest.mark.parametrize("suffix, kind", [
    (".jsonl", "jsonl"), (".jsonl.gz", "jsonl"), (".ndjson", "jsonl"), (".json", "jsonl"),
    (".csv", "csv"), (".csv.gz", "csv"), (".parquet", "parquet"), (".pq", "parquet"),
])
def test_catalogs_and_interactions_read_the_same_file_names(tmp_path, suffix, kind):
    items = write_source(tmp_path / f"items{suffix}", kind, [{"item_id": "a", "title": "A"}, {"item_id": "b", "title": "B"}])
    catalog = read_catalog(str(items))
    assert catalog.column("item_id").to_pylist() == ["a", "b"] and catalog.column("reject").null_count == 2
    events = write_source(tmp_path / f"events{suffix}", kind, [{"user_id": "u", "item_id": "a", "timestamp": 1},
                                                               {"user_id": "u", "item_id": "b", "timestamp": 2}])
    summary = import_interactions(new_db(tmp_path / "db", ["a", "b"]), str(events))
    assert (summary.input_rows, summary.imported) == (2, 2)


def test_catalogs_and_interactions_both_detect_amazon2023_jsonl(tmp_path):
    meta = write_source(tmp_path / "meta.jsonl.gz", "jsonl", [
        {"parent_asin": "B01", "title": "Lamp", "features": ["brass"], "description": ["tall"], "images": []}])
    catalog = read_catalog(str(meta))
    assert catalog.select(["item_id", "description"]).to_pylist() == [{"item_id": "B01", "description": "brass tall"}]
    reviews = write_source(tmp_path / "reviews.jsonl.gz", "jsonl", [
        {"user_id": "U1", "asin": "X", "parent_asin": "B01", "timestamp": 1588687728923}])
    db = new_db(tmp_path / "db", ["B01"])
    assert import_interactions(db, str(reviews)).imported == 1
    assert list(stored(db)["item_id"]) == ["B01"] and list(stored(db)["timestamp"]) == [1588687728]


@pytest.mark.parametrize(
    "kind, stamps, expected_format",
    [
        ("csv", [1700000000, 1700000060, 1700000120], "seconds"),
        ("csv", [1700000000000, 1700000060500, 1700000120999], "milliseconds"),
        ("jsonl", ["2023-11-14T22:13:20Z", "2023-11-14T22:14:20Z", "2023-11-14T22:15:20.5Z"], "ISO-8601"),
        ("parquet", [1700000000000, 1700000060000, 1700000120000], "milliseconds"),
    ],
)
def test_timestamp_formats_are_stored_as_seconds(tmp_path, kind, stamps, expected_format):
    db = new_db(tmp_path / "db", ["a", "b", "c"])
    rows = [{"user_id": "u", "item_id": i, "timestamp": t} for i, t in zip("abc", stamps)]
    summary = import_interactions(db, str(write_source(tmp_path / f"x.{kind}", kind, rows)))
    assert summary.timestamp_format == expected_format and summary.imported == 3
    assert list(stored(db)["timestamp"]) == [1700000000, 1700000060, 1700000120]


def test_unknown_items_missing_ids_and_bad_timestamps_are_rejected_with_reasons(tmp_path):
    db = new_db(tmp_path / "db", ["a", "b"])
    source = write_source(tmp_path / "x.csv", "csv", [
        {"user_id": "u1", "item_id": "a", "timestamp": "1700000000"},
        {"user_id": "u1", "item_id": "zzz", "timestamp": "1700000001"},
        {"user_id": "", "item_id": "a", "timestamp": "1700000002"},
        {"user_id": "u2", "item_id": "", "timestamp": "1700000003"},
        {"user_id": "u2", "item_id": "b", "timestamp": "yesterday"},
        {"user_id": "u2", "item_id": "b", "timestamp": "1700000005"},
    ])
    summary = import_interactions(db, str(source))
    assert summary.imported == 2 and adds_up(summary)
    assert summary.rejected == {"unknown item": 1, "missing user_id": 1, "missing item_id": 1, "bad timestamp": 1}
    got = rejects(db)
    assert list(got["row"]) == [1, 2, 3, 4] and set(got["stage"]) == {"interaction"}
    assert got.loc[0, "item_id"] == "zzz" and got.loc[0, "reason"].startswith("unknown item")
    assert "'yesterday'" in got.loc[3, "reason"] and got.loc[3, "source"] == str(source.resolve())
    assert list(stored(db)["row"]) == [0, 5]


def test_amazon2023_reviews_are_detected_use_parent_asin_and_ms_and_record_unreadable_lines(tmp_path):
    db = new_db(tmp_path / "db", ["B01", "B02"])
    path = tmp_path / "reviews.jsonl"
    review = {"rating": 5.0, "title": "ok", "text": "long text", "asin": "X", "parent_asin": "B01", "user_id": "U1"}
    path.write_text(
        json.dumps({**review, "timestamp": 1588687728923}) + "\n{not json\n\n"
        + json.dumps({**review, "parent_asin": "B02", "timestamp": 1588687729923}) + "\n"
    )
    summary = import_interactions(db, str(path))  # auto: a JSONL whose records carry parent_asin
    assert (summary.input_rows, summary.imported, summary.rejected) == (3, 2, {"unreadable line": 1})
    assert list(stored(db)["item_id"]) == ["B01", "B02"] and list(stored(db)["timestamp"]) == [1588687728, 1588687729]
    assert rejects(db).loc[0, "reason"].startswith("unreadable line: line 2")


def test_a_source_without_the_required_columns_is_refused(tmp_path):
    db = new_db(tmp_path / "db", ["a"])
    source = write_source(tmp_path / "x.csv", "csv", [{"user": "u", "item_id": "a", "timestamp": 1}])
    with pytest.raises(InteractionSourceError, match="lacks column"):
        import_interactions(db, str(source))
    with pytest.raises(InteractionSourceError, match="format"):
        import_interactions(db, str(tmp_path / "x.txt"))


def test_reimport_replaces_the_source_and_keeps_others(tmp_path):
    db = new_db(tmp_path / "db", ["a", "b"])
    rows = [{"user_id": "u", "item_id": i, "timestamp": 1700000000 + n} for n, i in enumerate("abz")]
    first = write_source(tmp_path / "one.csv", "csv", rows)
    other = write_source(tmp_path / "two.jsonl", "jsonl", rows[:1])
    import_interactions(db, str(first))
    import_interactions(db, str(other))
    import_interactions(db, str(first))
    assert len(stored(db)) == 3 and len(rejects(db)) == 1
    assert sorted(stored(db)["source"].str.rsplit("/", n=1).str[-1]) == ["one.csv", "one.csv", "two.jsonl"]


# ---------------------------------------------------------------- k-core

KCORE_ROWS = [("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b"), ("u3", "a"), ("u3", "c"), ("u4", "c")]


def test_kcore_mask_cascades_until_stable():
    # k=2: u4 has one row -> c falls to one -> u3 falls to one; a and b keep two users each
    users, items = np.array([u for u, _ in KCORE_ROWS]), np.array([i for _, i in KCORE_ROWS])
    assert list(kcore_mask(users, items, 2)) == [True] * 4 + [False] * 3
    assert not kcore_mask(users, items, 3).any()
    assert kcore_mask(users, items, 1).all()


def test_kcore_removals_are_recorded(tmp_path):
    db = new_db(tmp_path / "db", ["a", "b", "c"])
    rows = [{"user_id": u, "item_id": i, "timestamp": 1700000000 + n} for n, (u, i) in enumerate(KCORE_ROWS)]
    summary = import_interactions(db, str(write_source(tmp_path / "k.csv", "csv", rows)), kcore=2)
    assert (summary.imported, summary.kcore_dropped) == (4, 3) and adds_up(summary)
    got = rejects(db)
    assert list(got["row"]) == [4, 5, 6] and set(got["stage"]) == {"kcore"}


# ---------------------------------------------------------------- sequences and examples


def test_ties_keep_the_import_order(tmp_path):
    db = new_db(tmp_path / "db", ["a", "b", "c", "d"])
    rows = [
        {"user_id": "u", "item_id": "c", "timestamp": 1700000005},
        {"user_id": "u", "item_id": "a", "timestamp": 1700000005},
        {"user_id": "u", "item_id": "d", "timestamp": 1700000001},
        {"user_id": "u", "item_id": "b", "timestamp": 1700000005},
        {"user_id": "v", "item_id": "a", "timestamp": 1700000003},
    ]
    import_interactions(db, str(write_source(tmp_path / "t.csv", "csv", rows)))
    imported = store.open_table(db, store.INTERACTIONS).to_arrow()
    index = ItemIndex.from_db(db)
    for physical_order in (imported, imported.take(np.arange(len(rows))[::-1])):  # storage order must not matter
        db.create_table(store.INTERACTIONS, data=physical_order, mode="overwrite")
        summary = build_sequences(db)
        assert (summary.users, summary.short_users, summary.first_timestamp) == (2, 1, 1700000001)
        seqs = read_sequences(db).to_pylist()
        assert [r["user_id"] for r in seqs] == ["u", "v"]
        assert list(index.item_ids(seqs[0]["item_idx"])) == ["d", "c", "a", "b"]
        assert seqs[0]["timestamps"] == [1700000001, 1700000005, 1700000005, 1700000005]


HAND = {  # u: items 1..6 at t0 + 10*k; v: two items only (in no split)
    "user_id": ["u", "v"],
    "item_idx": [[1, 2, 3, 4, 5, 6], [7, 8]],
    "timestamps": [[1000, 1010, 1020, 1030, 1040, 1050], [1000, 2000]],
    "first_timestamp": [1000, 1000],
}


def object_array(lists) -> np.ndarray:
    out = np.empty(len(lists), dtype=object)
    for i, values in enumerate(lists):
        out[i] = np.array(values)
    return out


def hand_batches():
    yield pa.table(HAND)
    yield HAND  # plain lists
    yield {k: object_array(v) if k in ("item_idx", "timestamps") else np.array(v) for k, v in HAND.items()}  # Ray numpy
    yield {k: np.array(v[:1]) for k, v in HAND.items()}  # Ray gives equal-length lists as a 2-D array


def test_make_examples_train_last_is_prefix_augmentation():
    for rows in hand_batches():
        out = make_examples(rows, "train", max_len=2)
        assert set(out) == {"item_seq", "time_seq", "seq_len", "target"}
        assert out["item_seq"].tolist() == [[1, 0], [1, 2], [2, 3]]
        assert out["time_seq"].tolist() == [[0, 0], [0, 10], [10, 20]]
        assert out["seq_len"].tolist() == [1, 2, 2] and out["target"].tolist() == [2, 3, 4]
        assert all(v.dtype == np.int64 for v in out.values())


def test_make_examples_train_all_has_next_item_targets():
    out = make_examples(pa.table(HAND), "train", max_len=5, mode="all")
    assert out["item_seq"].tolist() == [[1, 2, 3, 0, 0]]
    assert out["target_seq"].tolist() == [[2, 3, 4, 0, 0]]
    assert out["time_seq"].tolist() == [[0, 10, 20, 0, 0]]
    assert out["seq_len"].tolist() == [3] and out["target"].tolist() == [4]
    # a window per stride: the later window trains on its last target only, the earliest on all of its own
    short = make_examples(pa.table(HAND), "train", max_len=2, mode="all")
    assert short["item_seq"].tolist() == [[2, 3], [1, 2]] and short["target_seq"].tolist() == [[0, 4], [2, 3]]
    assert short["target"].tolist() == [4, 3] and short["seq_len"].tolist() == [2, 2]


def trained_targets(examples) -> dict[int, tuple[int, ...]]:
    """target item -> the history (items before it) the example gives it; each target at most once."""
    seen = {}
    targets = examples.get("target_seq")
    for row, history in enumerate(examples["item_seq"]):
        positions = range(len(history)) if targets is not None else [examples["seq_len"][row] - 1]
        for i in positions:
            target = targets[row, i] if targets is not None else examples["target"][row]
            if target:
                assert target not in seen, f"target {target} trained twice"
                seen[target] = tuple(history[: i + 1][history[: i + 1] > 0])
    return seen


@pytest.mark.parametrize("max_len, stride", [(5, 1), (5, 2), (5, 5), (8, 3), (50, 25)])
def test_train_mode_all_trains_every_target_of_last_mode_once_with_its_context_cut_to_the_window(max_len, stride):
    rng = np.random.default_rng(max_len * 100 + stride)
    lengths = [1, 2, 3, 4, 5, 9, 17, 60, 121] + rng.integers(1, 80, 20).tolist()
    rows = {"item_idx": [[user * 1000 + i + 1 for i in range(n)] for user, n in enumerate(lengths)],  # unique ids
            "timestamps": [list(range(n)) for n in lengths], "first_timestamp": [0] * len(lengths)}
    last = trained_targets(make_examples(rows, "train", max_len, mode="last"))
    examples = make_examples(rows, "train", max_len, mode="all", stride=stride)
    every = trained_targets(examples)
    assert every.keys() == last.keys()  # every target of `last` mode, each once
    assert len(examples["target"]) == split_counts(pa.table(rows), max_len, stride)["train_examples_all"]
    for target, context in every.items():
        full = last[target]
        assert full[len(full) - len(context):] == context  # the same items right before the target
        assert len(context) >= min(len(full), max_len - stride + 1)
        if stride == 1:
            assert context == full


def test_make_examples_valid_and_test_keep_the_most_recent_items():
    valid = make_examples(pa.table(HAND), "valid", max_len=3)
    test = make_examples(pa.table(HAND), "test", max_len=3, t0=0)
    assert valid["item_seq"].tolist() == [[2, 3, 4]] and valid["target"].tolist() == [5]
    assert test["item_seq"].tolist() == [[3, 4, 5]] and test["target"].tolist() == [6]
    assert test["time_seq"].tolist() == [[1020, 1030, 1040]]
    # test examples name their user by a key that does not depend on the batch (runs pair by it); only test
    assert test["user_key"].tolist() == user_key_of(["u"]).tolist() and "user_key" not in valid
    assert user_key_of(["u", "v", "u"]).tolist()[0] == user_key_of(["u"]).tolist()[0] != user_key_of(["v"]).tolist()[0]
    assert user_key_of(["u"]).dtype == np.int64
    assert split_counts(pa.table(HAND), 3) == {
        "train_examples_last": 3, "train_examples_all": 1, "valid_examples": 1, "test_examples": 1,
        "test_histories_truncated": 1,
    }


def test_max_gap_covers_training_gaps_only():
    rows = pa.table({"item_idx": [[1, 2, 3, 4, 5]], "timestamps": [[0, 1, 4, 1027, 100000]], "first_timestamp": [0]})
    assert max_gap_s(rows) == 3  # training part: 0, 1, 4
    assert max_gap_s(rows, "test") == 1023  # adds the 1023 s gap
    assert n_intervals_for(max_gap_s(rows)) == int(np.floor(100 * np.log2(3 + 1))) + 1  # HM4SR's interval table
    assert n_intervals_for(max_gap_s(rows, "test")) == 1000 + 1  # log2(1024) = 10
    assert max_gap_s(pa.table({"item_idx": [[1, 2]], "timestamps": [[0, 5]], "first_timestamp": [0]})) == 0


# ---------------------------------------------------------------- item features


def test_item_index_order_and_lookup():
    index = ItemIndex(["b", "10", "a", "2", None, "a"])
    assert list(index.ids) == ["10", "2", "a", "b"] and index.num_embeddings == 5
    assert index.lookup(["a", "10", "nope", None]).tolist() == [3, 1, 0, 0]
    assert index.item_ids([4, 1]).tolist() == ["b", "10"]
    with pytest.raises(IndexError):
        index.item_ids([0])


def test_item_features_follow_the_item_index(tmp_path):
    ids = ["b", "10", "a", "2"]  # k-th id has text k + [0, .1, ...] and image -k - [0, .1, ...]
    db = new_db(tmp_path / "db", ids, categories=[["x"], ["y", "x"], [], ["y"]], image_missing={"a", "10"})
    index = ItemIndex.from_db(db)
    features = load_item_features(db, index)
    assert features["text"].shape == (5, TEXT_DIM) and features["image"].shape == (5, IMAGE_DIM)
    assert not features["text"][0].any() and not features["image"][0].any()
    for k, item in enumerate(ids):
        row = index.lookup([item])[0]
        np.testing.assert_allclose(features["text"][row], k + np.arange(TEXT_DIM) / 10)
        assert features["image_mask"][row] == (item not in {"a", "10"})
        if features["image_mask"][row]:
            np.testing.assert_allclose(features["image"][row], -k - np.arange(IMAGE_DIM) / 10)
        else:
            assert not features["image"][row].any()
    assert features["text_mask"].tolist() == [False, True, True, True, True]
    assert features["category_vocab"] == ["x", "y"]
    assert features["categories"].tolist() == [[0, 0], [1, 1], [0, 1], [0, 0], [1, 0]]  # pad, 10, 2, a, b


@pytest.mark.parametrize("with_image", [False, True])
def test_item_features_without_images(tmp_path, with_image):
    ids = ["a", "b"]
    db = new_db(tmp_path / "db", ids, image_missing=set(ids), with_image=with_image)
    features = load_item_features(db, ItemIndex.from_db(db))
    assert features["image"] is None and not features["image_mask"].any()
    assert features["text_mask"].tolist() == [False, True, True]


# ---------------------------------------------------------------- the flow


def test_flow_imports_and_reports(tmp_path, capsys):
    db = new_db(tmp_path / "db", ["a", "b", "c"])
    rows = [{"user_id": "u", "item_id": i, "timestamp": 1700000000 + n} for n, i in enumerate("abcz")]
    source = write_source(tmp_path / "f.csv", "csv", rows)
    flow = runpy.run_path(str(REPO / "flows" / "import_interactions.py"), run_name="flow")
    assert flow["main"](["--db", db.uri, "--source", str(source), "--max-len", "2"]) == 0
    out = capsys.readouterr().out
    assert "4 input rows, 3 imported, rejected: 1 unknown item" in out and "valid_examples 1" in out
    assert flow["main"](["--db", db.uri, "--source", str(tmp_path / "missing.csv")]) == 2
