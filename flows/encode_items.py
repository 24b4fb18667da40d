"""Encode an item catalog into the LanceDB feature store.

    python flows/encode_items.py --catalog ml-1m
    ray job submit --working-dir . -- python flows/encode_items.py --catalog items.jsonl --db s3://bucket/store
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under `ray job submit`

from encoders import DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_MODEL  # noqa: E402
from featurestore import store  # noqa: E402
from featurestore.formats import FORMATS  # noqa: E402
from featurestore.encode import DEFAULT_TEMPLATE, EncodeSettings  # noqa: E402
from featurestore.images import ImagePolicy  # noqa: E402
from featurestore.jobs import run_job  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--catalog", default="ml-1m", help="catalog file, or a built-in catalog: ml-1m, ml-100k")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--db", default=store.DEFAULT_DB, help="LanceDB URI (default: ./lancedb)")
    p.add_argument("--table", default=store.ITEMS)
    p.add_argument("--text-model", default=DEFAULT_TEXT_MODEL, help="built-in name, local path or cached transformers model")
    p.add_argument("--image-model", default=DEFAULT_IMAGE_MODEL, help="built-in name or cached timm model name")
    p.add_argument("--allow-model-download", action="store_true",
                   help="download a model that is not on this machine (Hugging Face hub, timm): for clusters with internet")
    p.add_argument("--text-template", default=DEFAULT_TEMPLATE, help="'|'-separated parts; empty parts are left out")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--actors", type=int, default=None, help="actors per encoder stage (default: one per GPU, or one)")
    p.add_argument("--gpus-per-actor", type=float, default=None, help="default: use GPUs when the cluster has them")
    p.add_argument("--limit", type=int, default=None, help="encode only the first N catalog rows")
    p.add_argument("--commit-rows", type=int, default=EncodeSettings.commit_rows,
                   help="commit the rows the workers staged at least this often (default: %(default)s)...")
    p.add_argument("--commit-seconds", type=float, default=EncodeSettings.commit_seconds,
                   help="...or at least every this many seconds (default: %(default)s): a killed run keeps them")
    p.add_argument("--summary-json", default=None, metavar="PATH",
                   help="also write the run's summary (counts, phase timings) to this JSON file")
    images = p.add_argument_group("image references (README: Image references are confined)")
    images.add_argument("--image-root", action="append", default=[], metavar="DIR",
                        help="a folder local image paths may resolve into, besides the catalog's (repeatable)")
    images.add_argument("--allow-private-hosts", action="store_true",
                        help="fetch from private, loopback and reserved addresses (link-local never)")
    images.add_argument("--max-image-bytes", type=int, default=ImagePolicy.max_bytes, help="default: %(default)s")
    images.add_argument("--max-image-pixels", type=int, default=ImagePolicy.max_pixels, help="default: %(default)s")
    images.add_argument("--image-deadline-s", type=float, default=ImagePolicy.deadline_s,
                        help="for one image's whole download (default: %(default)s)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from featurestore.encode import encode_catalog

    def job():
        summary = encode_catalog(
            catalog=args.catalog,
            fmt=args.format,
            db_uri=args.db,
            table=args.table,
            text_model=args.text_model,
            image_model=args.image_model,
            template=args.text_template,
            batch_size=args.batch_size,
            actors=args.actors,
            gpus_per_actor=args.gpus_per_actor,
            limit=args.limit,
            allow_model_download=args.allow_model_download,
            commit_rows=args.commit_rows,
            commit_seconds=args.commit_seconds,
            images=ImagePolicy(roots=tuple(args.image_root), allow_private_hosts=args.allow_private_hosts,
                               max_bytes=args.max_image_bytes, max_pixels=args.max_image_pixels,
                               deadline_s=args.image_deadline_s),
        )
        if args.summary_json:
            Path(args.summary_json).write_text(json.dumps(summary.to_json(), indent=2) + "\n")
        return summary

    return run_job(job)


if __name__ == "__main__":
    sys.exit(main())
