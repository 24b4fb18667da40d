"""Look up nearest items in the feature store.

    python flows/query_items.py --item-id 1 --k 10 --by both
    python flows/query_items.py --text "space adventure"
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under `ray job submit`

from featurestore import store  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default=store.DEFAULT_DB)
    p.add_argument("--table", default=store.ITEMS)
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--item-id", help="neighbours of this item")
    query.add_argument("--text", help="neighbours of a free-text query (embedded with the table's text encoder)")
    p.add_argument("--by", choices=["text", "image", "both"], default="text")
    p.add_argument("--k", type=int, default=10)
    return p.parse_args(argv)


def main(argv=None) -> int:
    import pandas as pd

    from featurestore.query import similar_items

    args = parse_args(argv)
    db = store.connect(args.db)
    result = similar_items(db, item_id=args.item_id, text=args.text, by=args.by, k=args.k, table=args.table)
    anchor = f"item {args.item_id}" if args.item_id else f"text {args.text!r}"
    print(f"{len(result)} nearest items to {anchor} by {args.by}:")
    with pd.option_context("display.max_colwidth", 60, "display.width", 160):
        shown = result.drop(columns=["categories"]).dropna(axis="columns", how="all")  # e.g. no images at all
        print(shown.to_string(index=False, float_format="%.3f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
