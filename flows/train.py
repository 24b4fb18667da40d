"""Train a sequential recommender on the LanceDB feature store with Ray Train (DDP over --num-workers).

    python flows/train.py --model sasrec --dataset ml-1m --db /data/ml1m --max-len 200 --epochs 200
    python flows/train.py --model hm4sr --num-workers 2 --hidden-size 64 --cp-weight 0.5 --name hm4sr-a
    python flows/train.py --resume --name hm4sr-a            # continue an interrupted run
    ray job submit --working-dir . -- python flows/train.py --model fame --storage s3://bucket/runs

Needs the tables `items` (flows/encode_items.py), `interactions` and `sequences`
(flows/import_interactions.py); with --dataset ml-1m or ml-100k an empty store is built first. Writes checkpoints and learning curves under --storage/--name, the run
record to the table `runs` and the trained item vectors to --vectors-table. Model hyper-parameters left
unset take the model's defaults (shown per model); with --resume, settings left unset keep the run's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under `ray job submit`

from featurestore.jobs import run_job  # noqa: E402
from training.cli import add_train_arguments, settings_from  # noqa: E402


def parse_args(argv=None) -> dict:
    """The settings the command line sets (others stay unset, so defaults or a resumed run's apply)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dests = add_train_arguments(parser)  # one flag per TrainConfig field and per model hyper-parameter
    return settings_from(parser.parse_args(argv), dests)


def main(argv=None) -> int:
    settings = parse_args(argv)
    from training import run_training

    return run_job(lambda: run_training(settings))


if __name__ == "__main__":
    sys.exit(main())
