"""What an epoch of each training mode processes on MovieLens: examples, history positions (what the encoder
costs) and trained targets (what the logits cost), for train_mode last, all at several window strides, and
the single window per user that train_mode all used before every target was covered.

    python bench/train_mode_cost.py --datasets ml-100k ml-1m --max-lens 50 200 --out bench/out/train_mode_cost.json

Counts only (no training): they follow from the sequence lengths and featurestore.sequences.make_examples.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featurestore import movielens  # noqa: E402 - after the path insert
from featurestore.sequences import MIN_INTERACTIONS, make_examples  # noqa: E402

USERS_PER_CALL = 200  # make_examples in slices of users: last mode at L 200 on ML-1M is 116M positions


def user_rows(name: str) -> dict[str, list]:
    """ML sequences as make_examples reads them (item ids need not be dense for counting)."""
    frame = movielens.load_interactions(name).sort_values(["user_id", "timestamp"], kind="stable")
    frame["item"] = frame["item_id"].astype("category").cat.codes.astype(np.int64) + 1
    groups = frame.groupby("user_id", sort=True)
    return {"item_idx": [g.to_numpy() for _, g in groups["item"]],
            "timestamps": [g.to_numpy() for _, g in groups["timestamp"]]}


def epoch_counts(rows: dict[str, list], max_len: int, mode: str, stride: int | None) -> dict[str, int]:
    examples = positions = targets = 0
    for start in range(0, len(rows["item_idx"]), USERS_PER_CALL):
        part = {name: values[start:start + USERS_PER_CALL] for name, values in rows.items()} | {"first_timestamp": [0]}
        batch = make_examples(part, "train", max_len, mode, t0=0, stride=stride)
        examples += len(batch["target"])
        positions += int(batch["seq_len"].sum())
        targets += int((batch["target_seq"] > 0).sum()) if "target_seq" in batch else len(batch["target"])
    return {"examples": examples, "positions": positions, "targets": targets}


def single_window_counts(rows: dict[str, list], max_len: int) -> dict[str, int]:
    """train_mode all before full coverage: one window per user, its last max_len training targets."""
    lengths = np.array([len(items) for items in rows["item_idx"]])
    trained = np.minimum(np.maximum(lengths - MIN_INTERACTIONS, 0), max_len)
    return {"examples": int((trained > 0).sum()), "positions": int(trained.sum()), "targets": int(trained.sum())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["ml-100k", "ml-1m"], choices=sorted(movielens.SOURCES))
    parser.add_argument("--max-lens", nargs="+", type=int, default=[50, 200])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "train_mode_cost.json")
    args = parser.parse_args(argv)
    results = []
    for name in args.datasets:
        rows = user_rows(name)
        for max_len in args.max_lens:
            cases = [("all, one window per user (before)", single_window_counts(rows, max_len))]
            for stride in sorted({max_len // 4, max_len // 2, max_len}):
                cases.append((f"all, stride {stride}", epoch_counts(rows, max_len, "all", stride)))
            cases.append(("last", epoch_counts(rows, max_len, "last", None)))
            before = cases[0][1]["positions"]
            for label, counts in cases:
                results.append({"dataset": name, "max_len": max_len, "mode": label, **counts,
                                "positions_vs_before": counts["positions"] / before})
    print("| dataset | L | mode | examples | positions | targets | positions vs before |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['dataset']} | {r['max_len']} | {r['mode']} | {r['examples']:,} | {r['positions']:,} | "
              f"{r['targets']:,} | {r['positions_vs_before']:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
