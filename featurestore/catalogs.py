"""Item catalogs -> one normalised Arrow table, plus the rows that cannot be used (recorded, never dropped).

Formats: generic Parquet / JSONL / CSV (`item_id` required; `title`, `description`, `categories` as a list or
`|`-separated text, `image` as a local path, file:// or http(s):// URL, or `image_bytes`), the built-in
MovieLens catalogs (`ml-1m`, `ml-100k`) and Amazon Reviews 2023 item metadata JSONL; `featurestore.formats` tells
which from the name.
"""
from __future__ import annotations

import base64
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from featurestore.formats import BUILTIN, detect_format, jsonl_records

CATALOG_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64()),  # 0-based row in the source: how reject records point back at it
        pa.field("item_id", pa.string()),
        pa.field("title", pa.string()),
        pa.field("description", pa.string()),
        pa.field("categories", pa.list_(pa.string())),
        pa.field("image_ref", pa.string()),  # resolved path or URL
        pa.field("image_bytes", pa.binary()),
    ]
)


class CatalogError(ValueError):
    """The catalog as a whole cannot be read (missing file, unknown format, no item_id column)."""


@dataclass
class Catalog:
    source: str
    rows: pa.Table  # CATALOG_SCHEMA, usable rows only
    rejects: list[dict] = field(default_factory=list)  # rows rejected whole while reading
    base_dir: Path | None = None  # relative image paths resolve against it; the default image root

    @property
    def input_rows(self) -> int:
        return self.rows.num_rows + len(self.rejects)


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(_text(v) for v in value if v is not None).strip()
    if isinstance(value, float) and value != value:  # NaN from a CSV hole
        return ""
    return str(value).strip()


def _categories(value) -> list[str]:
    if value is None or isinstance(value, float):
        return []
    if isinstance(value, str):
        value = value.split("|")
    return [str(c).strip() for c in value if c is not None and str(c).strip()]


def _image_ref(value, base_dir: Path | None) -> str | None:
    ref = _text(value)
    if not ref:
        return None
    if "://" in ref or base_dir is None:
        return ref
    # Lexically only: the path is not looked up here, so what is stored never shows where a symlink points
    # or whether a file exists. The fetch resolves it and confines it to the image roots (featurestore.images).
    return os.path.normpath(os.path.join(base_dir, ref))


def _image_bytes(value) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str) and value:
        return base64.b64decode(value)  # JSONL and CSV carry bytes as base64 text
    return None


def normalise(records, source: str, base_dir: Path | None) -> Catalog:
    """Generic records (dicts) -> Catalog. Rejects rows without an id, repeated ids and rows with nothing to encode."""
    rows, rejects, seen = [], [], {}
    for i, rec in enumerate(records):
        if isinstance(rec, Exception):  # a line the reader could not parse
            rejects.append({"source": source, "row": i, "item_id": None, "stage": "read", "reason": str(rec)})
            continue
        item_id = _text(rec.get("item_id"))
        try:
            image_bytes = _image_bytes(rec.get("image_bytes"))
        except ValueError as e:
            rejects.append({"source": source, "row": i, "item_id": item_id or None, "stage": "read",
                            "reason": f"image_bytes is not valid base64: {e}"})
            continue
        row = {
            "row": i,
            "item_id": item_id,
            "title": _text(rec.get("title")),
            "description": _text(rec.get("description")),
            "categories": _categories(rec.get("categories")),
            "image_ref": _image_ref(rec.get("image"), base_dir),
            "image_bytes": image_bytes,
        }
        reason = None
        if not item_id:
            reason = "missing item_id"
        elif item_id in seen:
            reason = f"item_id {item_id!r} repeats row {seen[item_id]}"
        elif not (row["title"] or row["description"] or row["categories"] or row["image_ref"] or row["image_bytes"]):
            reason = "no text and no image"
        if reason:
            rejects.append({"source": source, "row": i, "item_id": item_id or None, "stage": "read", "reason": reason})
            continue
        seen[item_id] = i
        rows.append(row)
    return Catalog(source, pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA), rejects, base_dir)


def _amazon2023_records(path: Path):
    """Amazon Reviews 2023 item metadata: parent_asin, title, features, description, categories, images[].large."""
    for rec in jsonl_records(path):
        if isinstance(rec, Exception):
            yield rec
            continue
        images = [im for im in rec.get("images") or [] if isinstance(im, dict) and im.get("large")]
        main = next((im for im in images if im.get("variant") == "MAIN"), images[0] if images else None)
        yield {
            "item_id": rec.get("parent_asin"),
            "title": rec.get("title"),
            "description": _text(rec.get("features")) + " " + _text(rec.get("description")),
            "categories": rec.get("categories") or [],
            "image": main["large"] if main else None,
        }


def _table_records(table: pa.Table):
    if "item_id" not in table.column_names:
        raise CatalogError(f"the catalog has no item_id column (columns: {', '.join(table.column_names)})")
    return table.to_pylist()


def _movielens_records(name: str):
    from featurestore.movielens import load_items

    for item in load_items(name).to_dict("records"):
        year = item.get("year")
        title = item["title"] if year is None or year != year else f"{item['title']} ({year})"
        yield {"item_id": item["item_id"], "title": title, "categories": item["genres"]}


def read_catalog(catalog: str, fmt: str = "auto", limit: int | None = None) -> Catalog:
    """Read any supported catalog; `limit` keeps its first rows (for trials)."""
    fmt = detect_format(catalog, fmt, CatalogError)
    if fmt in BUILTIN:
        records, source, base_dir = _movielens_records(fmt), fmt, None
    else:
        path = Path(catalog)
        if not path.is_file():
            raise CatalogError(f"catalog file {catalog!r} does not exist")
        source, base_dir = str(path.resolve()), path.resolve().parent
        if fmt == "parquet":
            records = _table_records(pq.read_table(path))
        elif fmt == "csv":
            options = pa_csv.ConvertOptions(column_types={"item_id": pa.string()}, strings_can_be_null=True)
            records = _table_records(pa_csv.read_csv(path, convert_options=options))
        elif fmt == "amazon2023":
            records = _amazon2023_records(path)
        else:
            records = jsonl_records(path)
    if limit is not None:
        records = itertools.islice(records, limit)
    return normalise(records, source, base_dir)
