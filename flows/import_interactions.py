"""Import user-item interactions into the LanceDB feature store and rebuild the per-user sequences.

    python flows/import_interactions.py --source ml-1m
    python flows/import_interactions.py --source reviews.jsonl --format amazon2023 --kcore 5
    ray job submit --working-dir . -- python flows/import_interactions.py --source ml-100k --db s3://bucket/store

The `items` table (flows/encode_items.py) must exist: interactions with items it does not hold are rejected.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under `ray job submit`

from featurestore import store  # noqa: E402
from featurestore.formats import FORMATS  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default=store.DEFAULT_DB, help="LanceDB URI (default: ./lancedb)")
    p.add_argument("--source", required=True, help="interaction file, or a built-in data set: ml-1m, ml-100k")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--kcore", type=int, default=0, help="keep only the iterative k-core of users and items (0 = off)")
    p.add_argument("--max-len", type=int, default=50, help="history length the examples will be cut to (for the report)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from featurestore import interactions, sequences

    try:
        db = store.connect(args.db)
        print(interactions.import_interactions(db, args.source, args.format, kcore=args.kcore))
        print(sequences.build_sequences(db))
    except (store.StoreError, interactions.InteractionSourceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = sequences.read_sequences(db)
    counts = sequences.split_counts(rows, args.max_len)
    print(f"examples at max_len={args.max_len}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"largest gap between consecutive training items: {sequences.max_gap_s(rows):,} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
