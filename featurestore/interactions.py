"""Interaction import: files or built-in MovieLens -> the `interactions` table, every unusable row recorded.

Sources: Parquet / CSV / JSONL with user_id, item_id, timestamp (seconds, milliseconds or ISO-8601 text,
detected once per file); Amazon Reviews 2023 review JSONL (user_id, parent_asin, timestamp in ms); the
built-in `ml-1m` / `ml-100k`. Rows whose item is not in `items`, or that lack a user/item id or a readable
timestamp, go to `interaction_rejects`; so do rows removed by the optional k-core filter (stage "kcore").
Re-importing a source replaces its rows and its rejects.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from featurestore import movielens, store
from featurestore.formats import detect_format, jsonl_records
from featurestore.sequences import ItemIndex
from featurestore.store import sql_string

COLUMNS = ("user_id", "item_id", "timestamp")
MS_THRESHOLD = 1e11  # as seconds that is the year 5138, as milliseconds March 1973

INTERACTIONS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("timestamp", pa.int64(), nullable=False),  # seconds since the epoch, UTC
        pa.field("source", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),  # 0-based row in the source: tie-break and reject pointer
    ]
)


class InteractionSourceError(ValueError):
    """The source as a whole cannot be read (missing file, unknown format, missing columns)."""


@dataclass
class ImportSummary:
    source: str
    input_rows: int
    imported: int
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> rows
    kcore_dropped: int = 0
    timestamp_format: str = ""

    def __str__(self) -> str:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.rejected.items())) or "none"
        return (
            f"{self.source}: {self.input_rows} input rows, {self.imported} imported, "
            f"rejected: {reasons}; dropped by k-core: {self.kcore_dropped} (timestamps read as {self.timestamp_format})"
        )


@dataclass
class RawInteractions:
    """A source read as text/numbers, in file order; `errors` holds a reason for lines that could not be read."""

    frame: pd.DataFrame  # user_id, item_id, timestamp (raw values)
    errors: np.ndarray  # object: None or a reason, one per row
    timestamp_unit: str | None = None  # "s" / "ms" when the format says so; None = detect


def _require_columns(names, source: str) -> None:
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise InteractionSourceError(f"{source} lacks column(s) {', '.join(missing)} (has {', '.join(map(str, names))})")


def _jsonl_frame(path: Path, item_key: str) -> tuple[pd.DataFrame, np.ndarray]:
    """JSONL line by line, keeping only the three fields, so review texts never pile up in memory."""
    wanted = ("user_id", item_key, "timestamp")
    records, errors = [], []
    for record in jsonl_records(path):
        unreadable = isinstance(record, ValueError)
        records.append({} if unreadable else {k: record[k] for k in wanted if k in record})
        errors.append(str(record) if unreadable else None)
    frame = pd.DataFrame.from_records(records).rename(columns={item_key: "item_id"})
    return frame, np.array(errors, dtype=object)


def read_source(source: str, fmt: str = "auto") -> RawInteractions:
    """The source's user_id, item_id and raw timestamp columns, one row per input row, in input order."""
    fmt = detect_format(source, fmt, InteractionSourceError)
    if fmt in movielens.SOURCES:
        frame = movielens.load_interactions(fmt)[list(COLUMNS)]
        return RawInteractions(frame, np.full(len(frame), None, dtype=object), "s")
    path = Path(source)
    if not path.is_file():
        raise InteractionSourceError(f"interaction source {source!r} is not a file")
    errors = None
    try:
        if fmt in ("jsonl", "amazon2023"):
            frame, errors = _jsonl_frame(path, "parent_asin" if fmt == "amazon2023" else "item_id")
        elif fmt == "parquet":
            frame = pq.read_table(path, columns=[c for c in COLUMNS if c in pq.read_schema(path).names]).to_pandas()
        else:  # csv: ids stay text ("007" is not 7)
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, usecols=lambda c: c in COLUMNS)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise InteractionSourceError(f"cannot read {source} as {fmt}: {e}") from e
    _require_columns(frame.columns, source)
    if errors is None:
        errors = np.full(len(frame), None, dtype=object)
    return RawInteractions(frame[list(COLUMNS)], errors, "ms" if fmt == "amazon2023" else None)


def id_strings(values: pd.Series) -> np.ndarray:
    """Ids as stripped strings (object array); None for missing/empty. Integral floats lose their ".0"."""
    if pd.api.types.is_float_dtype(values) and (values.dropna() % 1 == 0).all():
        values = values.astype("Int64")
    text = values.astype("string").str.strip()
    return text.mask(text == "").to_numpy(dtype=object, na_value=None)


def parse_timestamps(values: pd.Series, unit: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(seconds int64, parsed ok, detected format). The format is decided once for the whole file.

    Numbers are seconds, or milliseconds when their median is >= MS_THRESHOLD; text that is mostly not
    numeric is ISO-8601 (no zone = UTC). A value that does not fit the file's format is not parsed.
    """
    seconds = np.zeros(len(values), dtype=np.int64)
    if pd.api.types.is_datetime64_any_dtype(values):  # Parquet timestamp columns
        stamps = values.dt.tz_localize("UTC") if values.dt.tz is None else values.dt.tz_convert("UTC")
        ok = stamps.notna().to_numpy()
        seconds[ok] = (stamps[ok] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
        return seconds, ok, "timestamp"
    if pd.api.types.is_numeric_dtype(values):
        numbers = values.to_numpy(dtype=np.float64, na_value=np.nan)
        present = ~np.isnan(numbers)
    else:
        values = values.astype("string").str.strip()
        present = (values.notna() & (values != "")).to_numpy(dtype=bool, na_value=False)
        numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    numeric = np.isfinite(numbers)
    if unit or (present.any() and numeric.sum() * 2 >= present.sum()):
        unit = unit or ("ms" if np.median(np.abs(numbers[numeric])) >= MS_THRESHOLD else "s")
        seconds[numeric] = np.floor(numbers[numeric] / (1000 if unit == "ms" else 1)).astype(np.int64)
        return seconds, numeric, "milliseconds" if unit == "ms" else "seconds"
    stamps = pd.to_datetime(values.where(present), format="ISO8601", utc=True, errors="coerce")
    ok = stamps.notna().to_numpy()
    seconds[ok] = (stamps[ok] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    return seconds, ok, "ISO-8601"


def kcore_mask(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Rows kept by the iterative k-core: repeatedly drop users and items with fewer than k interactions."""
    user_codes, _ = pd.factorize(users)
    item_codes, _ = pd.factorize(items)
    keep = np.ones(len(users), dtype=bool)
    while True:
        user_counts = np.bincount(user_codes[keep], minlength=user_codes.max(initial=-1) + 1)
        item_counts = np.bincount(item_codes[keep], minlength=item_codes.max(initial=-1) + 1)
        still = keep & (user_counts[user_codes] >= k) & (item_counts[item_codes] >= k)
        if (still == keep).all():
            return keep
        keep = still


def _row_problems(raw: RawInteractions, users, items, ts_ok, ts_format, known) -> tuple[np.ndarray, np.ndarray]:
    """(problem, reason text) per row, None where the row is usable; the first problem listed wins."""
    problems = np.full(len(users), None, dtype=object)
    reasons = problems.copy()
    timestamps = raw.frame["timestamp"].to_numpy(dtype=object)
    checks = [
        ("unreadable line", pd.notna(raw.errors), lambda i: raw.errors[i]),
        ("missing user_id", pd.isna(users), None),
        ("missing item_id", pd.isna(items), None),
        ("bad timestamp", ~ts_ok, lambda i: f"{timestamps[i]!r} is not {ts_format} like the rest of the file"),
        ("unknown item", ~known, lambda i: f"{items[i]!r} is not in the items table"),
    ]
    for problem, mask, detail in checks:
        for i in np.flatnonzero(mask & pd.isna(problems)):
            problems[i] = problem
            reasons[i] = f"{problem}: {detail(i)}" if detail else problem
    return problems, reasons


def _delete_source(db, name: str, source: str):
    """Remove what an earlier import of `source` wrote to table `name`; the table, or None if absent."""
    table = store.open_table(db, name, required=False)
    if table is not None:
        table.delete(f"source = {sql_string(source)}")
    return table


def import_interactions(db, source: str, fmt: str = "auto", kcore: int | None = None, source_name: str | None = None) -> ImportSummary:
    """Import one source into `interactions`, replacing what an earlier import of the same source wrote.

    `source_name` (default: the built-in name or the file's absolute path) is what `source` columns hold.
    `kcore` = k keeps only the iterative k-core of users and items (None/0 = off).
    """
    fmt = detect_format(source, fmt, InteractionSourceError)
    name = source_name or (source if fmt in movielens.SOURCES else str(Path(source).resolve()))
    raw = read_source(source, fmt)
    index = ItemIndex.from_db(db)
    users, items = id_strings(raw.frame["user_id"]), id_strings(raw.frame["item_id"])
    seconds, ts_ok, ts_format = parse_timestamps(raw.frame["timestamp"], raw.timestamp_unit)
    known = index.lookup(items) > 0
    problems, reasons = _row_problems(raw, users, items, ts_ok, ts_format, known)

    usable = pd.isna(problems)
    kept = usable.copy()
    if kcore and kcore > 1:
        kept[usable] = kcore_mask(users[usable], items[usable], kcore)
    kcore_rows = np.flatnonzero(usable & ~kept)

    rows = np.flatnonzero(kept)
    data = pa.Table.from_arrays(
        [pa.array(users[rows], pa.string()), pa.array(items[rows], pa.string()), pa.array(seconds[rows]),
         pa.array(np.full(len(rows), name, dtype=object), pa.string()), pa.array(rows.astype(np.int64))],
        schema=INTERACTIONS_SCHEMA,
    )
    table = _delete_source(db, store.INTERACTIONS, name)
    if table is None:
        db.create_table(store.INTERACTIONS, data=data, schema=INTERACTIONS_SCHEMA)
    elif data.num_rows:
        table.add(data)
    _delete_source(db, store.INTERACTION_REJECTS, name)
    rejected = np.flatnonzero(~usable)
    records = [
        {"source": name, "row": int(i), "item_id": items[i], "stage": "interaction", "reason": reasons[i]} for i in rejected
    ] + [
        {"source": name, "row": int(i), "item_id": items[i], "stage": "kcore",
         "reason": f"k-core: user or item with fewer than {kcore} interactions"} for i in kcore_rows
    ]
    store.record_rejects(db, store.INTERACTION_REJECTS, records)
    return ImportSummary(
        source=name,
        input_rows=len(users),
        imported=len(rows),
        rejected=dict(Counter(problems[rejected])),
        kcore_dropped=len(kcore_rows),
        timestamp_format=ts_format,
    )
