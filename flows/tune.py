"""Search hyper-parameters with Ray Tune: ASHA + Optuna (or random / grid) over a model's search space.

    python flows/tune.py --model sasrec --dataset ml-100k --num-samples 32 --epochs 50 --monitor ndcg@10
    python flows/tune.py --model hm4sr --dataset ml-1m --space my_space.yaml --max-concurrent 4
    python flows/tune.py --sweep-resume --sweep-name hm4sr-sweep-20261201-2200 --model hm4sr --dataset ml-1m
    ray job submit --working-dir . -- python flows/tune.py --model fame --storage s3://bucket/runs

Every flows/train.py setting is a value fixed for all trials (`--epochs` is ASHA's limit too; a trial's
resources are its driver plus --num-workers x --cpus-per-worker / --gpus-per-worker); the search space
(tuning.space's defaults per model, or --space FILE) says what varies. Results: Tune's experiment in
--storage/<sweep name>, one run per trial under its runs/, a row per trial in the table `sweeps`, a
leaderboard and plots beside them, and --final-seeds runs of the best configuration.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under `ray job submit`

from featurestore.jobs import run_job  # noqa: E402
from training.cli import add_dataclass_arguments, add_train_arguments, settings_from  # noqa: E402
from tuning.space import SpaceError, check_space, default_space, load_space  # noqa: E402
from tuning.sweep import SweepConfig  # noqa: E402

def parse_args(argv=None) -> tuple[dict, dict, SweepConfig]:
    """(training settings fixed for all trials, the search space, the sweep's settings); a bad argument or
    space exits with one message, before Ray starts."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep_group = parser.add_argument_group("the sweep")
    sweep_group.add_argument("--space", help="a YAML or JSON search space (default: the model's, tuning.space)")
    sweep_dests = add_dataclass_arguments(sweep_group, {"sweep": SweepConfig}, dest_prefix="sweep.")
    train_dests = add_train_arguments(parser.add_argument_group("training settings, fixed for every trial"))
    args = parser.parse_args(argv)
    settings = settings_from(args, train_dests)
    if {"name", "resume"} & set(settings):  # a sweep names and resumes its trials' runs itself
        parser.exit(2, "error: --name and --resume name a single run; a sweep takes --sweep-name and --sweep-resume\n")
    sweep_values = {dest.removeprefix("sweep."): getattr(args, dest) for dest in sweep_dests
                    if getattr(args, dest) is not None}
    try:
        from training.config import TrainConfig

        train = TrainConfig.from_dict(settings)
        sweep = SweepConfig(**sweep_values)
        space = load_space(args.space) if args.space else default_space(train.model)
        check_space(space, train.model, sweep.search, train.to_dict())
    except (ValueError, SpaceError) as error:
        parser.exit(2, f"error: {error}\n")
    return settings, space, sweep


def main(argv=None) -> int:
    settings, space, sweep = parse_args(argv)
    from tuning.sweep import run_sweep

    return run_job(lambda: run_sweep(settings, space, sweep))


if __name__ == "__main__":
    sys.exit(main())
