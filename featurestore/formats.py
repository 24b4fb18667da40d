"""Source formats shared by the catalog and interaction readers: one rule for telling a format from a name.

A name's last suffix, after a compression suffix, gives the format (`items.jsonl.gz` is JSONL); a JSONL whose
first record has `parent_asin` but no `item_id` is Amazon Reviews 2023 (item metadata or reviews alike).
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pyarrow as pa

from featurestore import movielens

BUILTIN = tuple(movielens.SOURCES)
FORMATS = ("auto", "parquet", "jsonl", "csv", "amazon2023", *BUILTIN)
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst")
BY_SUFFIX = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl",
             ".json": "jsonl"}


def open_text(path: Path):
    """A text handle on a file, decompressed when its name ends in a compression suffix."""
    return io.TextIOWrapper(pa.input_stream(str(path), compression="detect"), encoding="utf-8")


def jsonl_records(path: Path):
    """Each non-blank line as a dict, or a ValueError saying why that line is not one (the caller records it)."""
    with open_text(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield ValueError(f"line {number} is not valid JSON: {e.msg}")
                continue
            yield record if isinstance(record, dict) else ValueError(f"line {number} is not a JSON object")


def _is_amazon2023(first_line: bytes) -> bool:
    try:
        first = json.loads(first_line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(first, dict) and "parent_asin" in first and "item_id" not in first


def open_binary(path: str, options: dict | None = None):
    """A binary stream over a local or object-store file (`objectstore.filesystem`, with `options` if given),
    decompressed when its name ends in a compression suffix."""
    from featurestore import objectstore

    fs, fs_path = objectstore.filesystem(path if "://" in path else os.path.abspath(path), options)
    stream = fs.open_input_stream(fs_path)
    return pa.input_stream(stream, compression="detect") if path.lower().endswith(COMPRESSION_SUFFIXES) else stream


def first_line(path: str) -> bytes:
    """A file's first line; b"" for a path that is not a file."""
    try:
        with open_binary(path) as f:
            return io.BufferedReader(f).readline()
    except (FileNotFoundError, IsADirectoryError):
        return b""


def detect_format(source: str, fmt: str = "auto", error_type: type[ValueError] = ValueError) -> str:
    """The format named, or the one the source's name (and, for JSONL, its first record) shows.

    `error_type` is the reader's own error, so a bad format fails like any other bad source of that reader.
    """
    if fmt not in FORMATS:
        raise error_type(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    if source in BUILTIN:
        return source
    suffixes = [s.lower() for s in Path(source).suffixes if s.lower() not in COMPRESSION_SUFFIXES]
    if not suffixes or suffixes[-1] not in BY_SUFFIX:
        raise error_type(f"cannot tell the format of {source!r} from its name ({', '.join(BY_SUFFIX)}, optionally "
                         f"{'/'.join(COMPRESSION_SUFFIXES)}); pass --format ({', '.join(FORMATS[1:])})")
    fmt = BY_SUFFIX[suffixes[-1]]
    if fmt == "jsonl" and _is_amazon2023(first_line(source)):
        return "amazon2023"
    return fmt
