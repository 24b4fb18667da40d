"""Item index, per-user sequences, leave-one-out examples and frozen item features: what models read.

Batch contract of `make_examples` (numpy, B examples, L = max_len):
  item_seq   (B, L) int64  item indices, right-padded with 0, the most recent L items of the history
  time_seq   (B, L) int64  seconds since the dataset's first interaction, 0 on padding
  seq_len    (B,)   int64  number of real items in item_seq
  target     (B,)   int64  the item that follows the history
  target_seq (B, L) int64  train + mode "all" only: the next item at each position, 0 where none
                           or where another window of the user trains that target
Leave-one-out: per user (chronological), last item = test target, second to last = validation target,
everything before = training part. Users with fewer than MIN_INTERACTIONS are kept in the `sequences`
table, counted in the build summary and left out of every split.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa

from featurestore import store
from featurestore.store import read_columns, sql_string

SEQUENCES = "sequences"
MIN_INTERACTIONS = 3  # train + valid target + test target
SPLITS = ("train", "valid", "test")
MODES = ("last", "all")

SEQUENCES_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_idx", pa.list_(pa.int32())),  # chronological, ItemIndex indices
        pa.field("timestamps", pa.list_(pa.int64())),  # seconds since the epoch, aligned with item_idx
        pa.field("first_timestamp", pa.int64()),  # the dataset's first interaction: origin of time_seq
    ]
)


class ItemIndex:
    """item_id <-> dense index 1..N, 0 = padding.

    Order: the distinct non-null item ids of the `items` table sorted as Python strings (Unicode code
    points, so "10" < "2"); index = position + 1. It depends only on the set of ids, so a model and the
    feature matrices built from the same `items` table agree.
    """

    def __init__(self, item_ids: Iterable[str]):
        self.ids = np.array(sorted({i for i in item_ids if i is not None}), dtype=object)
        self._positions = pd.Index(self.ids)

    @classmethod
    def from_db(cls, db) -> "ItemIndex":
        return cls(read_columns(db, store.ITEMS, ["item_id"]).column("item_id").to_pylist())

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_embeddings(self) -> int:
        """Rows of an embedding table over this index, padding row included."""
        return len(self.ids) + 1

    def lookup(self, item_ids) -> np.ndarray:
        """Indices (int64) of `item_ids`; 0 for an id the index does not hold."""
        return self._positions.get_indexer(pd.Index(np.asarray(item_ids, dtype=object))).astype(np.int64) + 1

    def item_ids(self, indices) -> np.ndarray:
        """Item ids of indices 1..N (object array)."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 1 or indices.max() > len(self.ids)):
            raise IndexError(f"item index outside 1..{len(self.ids)}")
        return self.ids[indices - 1]


@dataclass
class SequenceSummary:
    users: int
    interactions: int
    short_users: int  # fewer than MIN_INTERACTIONS: kept in the table, in no split
    unknown_items: int  # interactions whose item is no longer in `items`
    first_timestamp: int | None

    def __str__(self) -> str:
        return (
            f"sequences: {self.users} users, {self.interactions} interactions, first timestamp {self.first_timestamp}; "
            f"{self.short_users} users with < {MIN_INTERACTIONS} interactions are in no split; "
            f"{self.unknown_items} interactions skipped (item not in items)"
        )


def build_sequences(db, sources: list[str] | None = None, index: ItemIndex | None = None) -> SequenceSummary:
    """Rewrite the `sequences` table from `interactions` (all sources, or the given ones).

    Each user's interactions are ordered by timestamp; ties keep the import order (source, then row).
    """
    index = index or ItemIndex.from_db(db)
    where = f"source IN ({', '.join(sql_string(s) for s in sources)})" if sources else None
    data = read_columns(db, store.INTERACTIONS, ["user_id", "item_id", "timestamp", "source", "row"], where)
    item_idx = index.lookup(data.column("item_id").to_numpy(zero_copy_only=False))
    known = item_idx > 0
    data, item_idx = data.filter(pa.array(known)), item_idx[known]

    user_codes, users = pd.factorize(data.column("user_id").to_numpy(zero_copy_only=False), sort=True)
    source_codes, _ = pd.factorize(data.column("source").to_numpy(zero_copy_only=False), sort=True)
    timestamps = data.column("timestamp").to_numpy()
    order = np.lexsort((data.column("row").to_numpy(), source_codes, timestamps, user_codes))
    lengths = np.bincount(user_codes, minlength=len(users))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    first = int(timestamps.min()) if len(timestamps) else None

    table = pa.Table.from_arrays(
        [
            pa.array(users.astype(object), pa.string()),
            pa.ListArray.from_arrays(offsets, pa.array(item_idx[order].astype(np.int32))),
            pa.ListArray.from_arrays(offsets, pa.array(timestamps[order].astype(np.int64))),
            pa.array(np.full(len(users), first if first is not None else 0, dtype=np.int64)),
        ],
        schema=SEQUENCES_SCHEMA,
    )
    db.create_table(SEQUENCES, data=table, schema=SEQUENCES_SCHEMA, mode="overwrite")
    return SequenceSummary(
        users=len(users),
        interactions=len(item_idx),
        short_users=int((lengths < MIN_INTERACTIONS).sum()),
        unknown_items=int((~known).sum()),
        first_timestamp=first,
    )


def read_sequences(db) -> pa.Table:
    return read_columns(db, SEQUENCES)


def _ragged(column) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (flat values, lengths), whatever form the batch gives it in.

    Ray Data numpy batches hold object arrays of arrays (or a 2-D array when every list has the same
    length); pyarrow batches hold list arrays; plain Python lists of lists work too.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column, (pa.ListArray, pa.LargeListArray)):
        lengths = column.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
        return column.flatten().to_numpy(zero_copy_only=False), lengths.astype(np.int64)
    if isinstance(column, np.ndarray) and column.ndim == 2:
        return column.reshape(-1), np.full(len(column), column.shape[1], dtype=np.int64)
    lengths = np.fromiter((len(v) for v in column), dtype=np.int64, count=len(column))
    values = np.concatenate([np.asarray(v) for v in column]) if lengths.sum() else np.zeros(0, dtype=np.int64)
    return values, lengths


def _first_timestamp(rows) -> int:
    column = rows["first_timestamp"]
    values = column.to_numpy() if isinstance(column, (pa.ChunkedArray, pa.Array)) else np.asarray(column)
    return int(values[0]) if len(values) else 0


def default_stride(max_len: int) -> int:
    """Mode "all": targets a window adds to the next one's (half a window: each target keeps >= L/2 context)."""
    return max(1, max_len // 2)


@dataclass(frozen=True)
class Examples:
    """Where each example's history lies in the flat item array of its batch of users."""

    hist_end: np.ndarray  # flat index where the history ends (exclusive) = its target
    user_start: np.ndarray  # flat index of its user's first item
    first_target: np.ndarray | None = None  # mode "all": flat index of the window's first counted target


def _windows(starts: np.ndarray, lengths: np.ndarray, max_len: int, stride: int) -> Examples:
    """Mode "all": each user's training targets 1..T (T = length - 3), each trained by exactly one window.

    Window k ends at target T - k * stride, holds up to max_len items before it and trains on its last
    `stride` targets; the user's earliest window (the first that starts at the user's first item) trains on
    all of its targets. So a target's context is the one `last` mode gives it, cut to the window: at least
    max_len - stride + 1 items (all of them when the history is shorter), and stride 1 is `last` mode.
    """
    targets = np.where(lengths >= MIN_INTERACTIONS + 1, lengths - MIN_INTERACTIONS, 0)  # T per user
    windows = np.where(targets > 0, 1 + -(-np.maximum(targets - max_len, 0) // stride), 0)
    user = np.repeat(np.arange(len(lengths)), windows)
    k = np.arange(windows.sum()) - np.repeat(np.cumsum(windows) - windows, windows)
    last_target = targets[user] - k * stride  # relative to the user's first item
    first_target = np.where(k == windows[user] - 1, 1, last_target - stride + 1)
    return Examples(starts[user] + last_target, starts[user], starts[user] + first_target)


def _examples(starts: np.ndarray, lengths: np.ndarray, split: str, mode: str, max_len: int,
              stride: int) -> Examples:
    eligible = lengths >= MIN_INTERACTIONS
    ends = starts + lengths
    if split == "test":
        return Examples(ends[eligible] - 1, starts[eligible])
    if split == "valid":
        return Examples(ends[eligible] - 2, starts[eligible])
    if mode == "all":
        return _windows(starts, lengths, max_len, stride)
    # mode "last": every prefix of the training part predicts its next item
    counts = np.where(eligible, lengths - MIN_INTERACTIONS, 0)
    user = np.repeat(np.arange(len(lengths)), counts)
    step = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return Examples(starts[user] + 1 + step, starts[user])


def make_examples(rows, split: str, max_len: int, mode: str = "last", t0: int | None = None,
                  stride: int | None = None) -> dict[str, np.ndarray]:
    """Leave-one-out examples from `sequences` rows (a Ray Data batch, a pyarrow table or a dict of lists).

    split "train": mode "last" = one example per prefix of the training part (RecBole-style augmentation);
    mode "all" = windows of up to max_len items over the training part with `target_seq`, every training
    target counted in exactly one window (see _windows; `stride` defaults to default_stride(max_len)).
    "valid": history = all but the last two, target = second to last. "test": history = all but the last,
    target = last. `t0` defaults to the rows' `first_timestamp`. Test examples of rows with `user_id` carry
    `user_key` (user_key_of), so per-user results of different runs pair.
    """
    if split not in SPLITS or mode not in MODES:
        raise ValueError(f"split must be one of {SPLITS} and mode one of {MODES}, got {split!r}, {mode!r}")
    stride = default_stride(max_len) if stride is None else stride
    if max_len < 1 or not 1 <= stride <= max_len:
        raise ValueError(f"max_len must be >= 1 and stride in 1..max_len, got {max_len}, {stride}")
    items, lengths = _ragged(rows["item_idx"])
    times, _ = _ragged(rows["timestamps"])
    items, times = items.astype(np.int64), times.astype(np.int64)
    t0 = _first_timestamp(rows) if t0 is None else t0
    starts = np.cumsum(lengths) - lengths

    examples = _examples(starts, lengths, split, mode, max_len, stride)
    seq_len = np.minimum(examples.hist_end - examples.user_start, max_len)
    positions = np.arange(max_len)
    padding = positions[None, :] >= seq_len[:, None]
    flat = (examples.hist_end - seq_len)[:, None] + positions[None, :]
    flat[padding] = 0  # any valid index; zeroed below (in place: these arrays are B x L)
    batch = {"item_seq": items[flat], "time_seq": times[flat] - t0}
    if examples.first_target is not None:
        flat += 1  # within a user: the history ends before the user's training target
        batch["target_seq"] = items[flat]
        batch["target_seq"][flat < examples.first_target[:, None]] = 0  # an earlier window trains these
    for name in list(batch):
        batch[name][padding] = 0
    batch["seq_len"] = seq_len.astype(np.int64)
    batch["target"] = items[examples.hist_end]
    if split == "test" and "user_id" in _columns(rows):
        eligible = lengths >= MIN_INTERACTIONS  # the users _examples gave a test example, in order
        batch["user_key"] = user_key_of(np.asarray(_column_values(rows["user_id"]), dtype=object)[eligible])
    return batch


def user_key_of(user_ids) -> np.ndarray:
    """(U,) int64 keys of user ids: the first 8 bytes of their BLAKE2b digest, the same in every run and process
    (a collision needs ~4e9 users for even odds)."""
    return np.array([int.from_bytes(hashlib.blake2b(str(user).encode(), digest_size=8).digest(), "little",
                                    signed=True) for user in user_ids], dtype=np.int64)


def _columns(rows) -> list[str]:
    return list(rows.column_names) if isinstance(rows, pa.Table) else list(rows)


def _column_values(column) -> list:
    return column.to_pylist() if isinstance(column, (pa.ChunkedArray, pa.Array)) else list(column)


def max_gap_s(rows, split: str = "train") -> int:
    """The largest gap (seconds) between consecutive items of the histories `split` feeds a model; 0 if none.

    "train" scans each user's training part, "test" the longer test histories (which can hold a larger gap
    than the training data). For batched data, take the max over batches.
    """
    items, lengths = _ragged(rows["item_idx"])
    times, _ = _ragged(rows["timestamps"])
    last = {"train": 3, "valid": 3, "test": 2}[split]  # a history ends `last` - 1 items before the user's end
    position = np.arange(len(items)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    usable = np.repeat(lengths >= MIN_INTERACTIONS, lengths) & (position >= 1)
    usable &= position <= np.repeat(lengths - last, lengths)
    if not usable.any():
        return 0
    gaps = (times.astype(np.int64)[1:] - times.astype(np.int64)[:-1])[usable[1:]]
    return int(gaps.max())


def split_counts(rows, max_len: int, stride: int | None = None) -> dict[str, int]:
    """What make_examples will yield at `max_len` (and `stride`), from the sequence lengths alone (cheap to print).

    Both training modes train on the same targets, "train_examples_last" of them; "all" packs them into
    fewer examples (windows).
    """
    _, lengths = _ragged(rows["item_idx"])
    eligible = lengths >= MIN_INTERACTIONS
    targets = int(np.maximum(lengths[eligible] - MIN_INTERACTIONS, 0).sum())
    stride = default_stride(max_len) if stride is None else stride
    return {
        "train_examples_last": targets,
        "train_examples_all": len(_windows(np.zeros_like(lengths), lengths, max_len, stride).hist_end),
        "valid_examples": int(eligible.sum()),
        "test_examples": int(eligible.sum()),
        "test_histories_truncated": int((lengths[eligible] - 1 > max_len).sum()),
    }


def category_labels(item_ids, categories, index: ItemIndex) -> tuple[list[str], np.ndarray]:
    """(sorted category vocabulary, multi-hot labels (N+1, C) float32 in `index` order, row 0 zeros)."""
    item_idx = index.lookup(item_ids)
    lists = [list(c) if c is not None else [] for c in categories]
    flat = np.array([c for cs in lists for c in cs], dtype=object)
    vocab = sorted(set(flat.tolist()))
    labels = np.zeros((index.num_embeddings, len(vocab)), dtype=np.float32)
    rows = np.repeat(item_idx, [len(cs) for cs in lists])
    columns = pd.Index(vocab).get_indexer(pd.Index(flat)) if len(flat) else np.zeros(0, dtype=np.int64)
    known = rows > 0
    labels[rows[known], columns[known]] = 1.0
    return vocab, labels


def _vector_rows(column: pa.ChunkedArray, item_idx: np.ndarray, n_rows: int) -> tuple[np.ndarray | None, np.ndarray]:
    """An embedding column placed at its items' indices: (matrix or None when all null, present mask)."""
    column = column.combine_chunks()
    present = ~column.is_null().to_numpy(zero_copy_only=False) & (item_idx > 0)
    mask = np.zeros(n_rows, dtype=bool)
    if not present.any():
        return None, mask
    values = column.filter(pa.array(present)).flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    vectors = values.reshape(int(present.sum()), -1)
    matrix = np.zeros((n_rows, vectors.shape[1]), dtype=np.float32)
    matrix[item_idx[present]] = vectors
    mask[item_idx[present]] = True
    return matrix, mask


def load_item_features(db, index: ItemIndex) -> dict:
    """Frozen item features in `index` order (row i = item index i, row 0 = padding, all zeros).

    A missing modality (null embedding, or an item of the index absent from `items`) is a zero row with a
    False mask bit. "image" is None when the table has no image_emb column or it is null everywhere.
    """
    names = set(store.open_table(db, store.ITEMS).schema.names)
    columns = ["item_id", "text_emb", "categories"] + (["image_emb"] if "image_emb" in names else [])
    data = read_columns(db, store.ITEMS, columns)
    item_idx = index.lookup(data.column("item_id").to_numpy(zero_copy_only=False))
    n_rows = index.num_embeddings
    text, text_mask = _vector_rows(data.column("text_emb"), item_idx, n_rows)
    if text is None:
        raise store.StoreError("items.text_emb is null for every item: run the encoding flow first")
    image, image_mask = (
        _vector_rows(data.column("image_emb"), item_idx, n_rows) if "image_emb" in columns else (None, np.zeros(n_rows, bool))
    )
    vocab, labels = category_labels(data.column("item_id").to_pylist(), data.column("categories").to_pylist(), index)
    return {
        "text": text,
        "text_mask": text_mask,
        "image": image,
        "image_mask": image_mask,
        "categories": labels,
        "category_vocab": vocab,
    }
