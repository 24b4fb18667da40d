"""Issue 10's train_mode gap on ML-100k: loss normalisation and the users within a batch, in one process.

bench/results/train_mode_ml100k.md compares train_mode "all" (windows of max_len items, each training
`target_seq` targets) with "last" (one example per prefix) through the training flow. Two of its candidates
need a training step the flow does not have, so this runs the flow's own parts without Ray, as
bench/ml1m_one_process.py does (training.steps.fit: length-sorted batches, early stopping, full-ranking
metrics; the model config the flow resolves), with two knobs:

  --loss token   the project's loss (recmodels/base.py next_item_loss): the mean CE over every target of
                 the batch, so a window of a long history weighs ~27-50 targets, a short one a few
  --loss window  each window's targets averaged first, then the mean over the batch's windows, so every
                 window (one user's stretch of history) weighs the same, as every example does in "last"
  --order global the flow's batching over a shuffle of all rows (the flow shuffles within a buffer of 8
                 batches of one Ray block, ~236 users): windows of 8 x batch rows, each length-sorted
  --order spread every batch `batch` rows of one global shuffle, not length-sorted (the control of grouped)
  --order grouped every batch `batch` consecutive rows of users in a random order (a user's windows or
                 prefixes together), not length-sorted: the same rows, targets per step and steps per epoch
                 as spread, drawn from as few users as the rows allow
  --order chunked like grouped, but each user's rows cut into runs of --chunk consecutive rows and the runs
                 shuffled: train_mode last with --chunk 25 gives each batch of 256 prefixes the users of a
                 batch of ~10 stride-25 windows ("all"), with last's contexts and one dropout mask per prefix

    python bench/train_mode_gap.py export --db /tmp/exp_db/ml100k --out /tmp/gap_data/ml100k_all.npz \\
        --train-mode all --max-len 50
    python bench/train_mode_gap.py train --data /tmp/gap_data/ml100k_all.npz --batch-size 256 --seed 1 \\
        --loss window --out /tmp/gap_data/r7.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ml1m_one_process import SPLITS, windows  # noqa: E402 - after the path insert
from recmodels import MODELS, DataFacts, create_model  # noqa: E402
from training.checkpoint import Progress  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.precision import grad_scaler  # noqa: E402
from training.steps import EVAL_SORT_WINDOW, EpochData, LossModel, Reporting, fit, weights_copy, worker_seed  # noqa

LOSSES = ("token", "window")
ORDERS = ("global", "spread", "grouped", "chunked")


def export(argv: list[str]) -> None:
    """The store's examples of every split in one .npz, with each training row's user (for --order grouped)."""
    import lance

    from featurestore import store
    from featurestore.sequences import SEQUENCES, make_examples
    from training.data import SEQUENCE_COLUMNS, ensure_dataset, snapshot_store

    parser = argparse.ArgumentParser(prog="train_mode_gap.py export")
    parser.add_argument("--db", required=True)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--out", required=True)
    parser.add_argument("--train-mode", default="all", choices=("all", "last"))
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--window-stride", type=int, default=None)
    args = parser.parse_args(argv)
    db = store.connect(args.db)
    ensure_dataset(db, args.dataset)
    snapshot, _ = snapshot_store(db, args.max_len, args.train_mode, 1, args.window_stride)
    rows = lance.dataset(snapshot.sequences_uri, version=snapshot.versions[SEQUENCES]).to_table(
        columns=SEQUENCE_COLUMNS)
    arrays = {}
    for split in SPLITS:
        for name, array in make_examples(rows, split, args.max_len, args.train_mode,
                                         stride=args.window_stride).items():
            arrays[f"{split}__{name}"] = array
    # rows come out user by user (featurestore.sequences._examples): count each user's to label them
    t0 = int(rows["first_timestamp"][0].as_py())
    per_user = [len(make_examples(rows.slice(u, 1), "train", args.max_len, args.train_mode, t0=t0,
                                  stride=args.window_stride)["target"]) for u in range(rows.num_rows)]
    users = np.repeat(np.arange(rows.num_rows), per_user)
    if len(users) != len(arrays["train__target"]):
        raise RuntimeError(f"{len(users)} user labels for {len(arrays['train__target'])} training rows")
    info = {"dataset": args.dataset, "n_items": snapshot.n_items, "users": snapshot.users,
            "max_len": args.max_len, "train_mode": args.train_mode, "window_stride": args.window_stride,
            "store_versions": snapshot.versions, "made_by": "python bench/train_mode_gap.py export " + " ".join(argv)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, info=np.array(json.dumps(info)), train_user=users, **arrays)
    targets = int((arrays["train__target_seq"] > 0).sum()) if "train__target_seq" in arrays else len(users)
    print(f"wrote {args.out}: {len(users)} training rows ({targets} targets) of {rows.num_rows} users, "
          f"{snapshot.n_items} items", flush=True)


class WindowMeanLoss(nn.Module):
    """SASRec's full-softmax CE with every window weighted alike: each row's targets' mean, then the mean
    over rows. A batch without target_seq (train_mode last) has one target per row: the project's loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        model = self.model
        if "target_seq" not in batch:
            return model.loss(batch)
        states = model(batch)  # (B, L, d)
        has_target = batch["target_seq"] > 0
        row_of = has_target.nonzero()[:, 0]  # the window of each target, in states[has_target]'s order
        ce = F.cross_entropy(model.logits(states[has_target], model.candidate_matrix()),
                             batch["target_seq"][has_target], reduction="none")
        counts = has_target.sum(dim=1)
        sums = torch.zeros(len(counts), dtype=ce.dtype, device=ce.device).index_add_(0, row_of, ce)
        kept = counts > 0
        loss = (sums[kept] / counts[kept]).mean()
        return loss, {"ce": loss.detach()}


def batch_windows(split: dict[str, torch.Tensor], users: torch.Tensor, order: str, batch_size: int,
                  sort_window: int, generator: torch.Generator, chunk: int = 25) -> Iterator[dict]:
    """This epoch's training rows for length_sorted_batches (see the module's --order)."""
    if order == "global":
        yield from windows(split, sort_window * batch_size, generator)
        return
    count = len(users)
    if order == "spread":
        rows = torch.randperm(count, generator=generator)
    elif order == "grouped":  # users in a random order, each user's rows together, cut from a random offset
        rank = torch.empty(int(users.max()) + 1, dtype=torch.int64)
        rank[torch.randperm(len(rank), generator=generator)] = torch.arange(len(rank))
        rows = torch.argsort(rank[users] * count + torch.arange(count))
        rows = rows.roll(-int(torch.randint(batch_size, (1,), generator=generator)))
    else:  # chunked: runs of `chunk` consecutive rows of one user (users' rows come in order), runs shuffled
        first = torch.ones(count, dtype=torch.bool)
        first[1:] = users[1:] != users[:-1]
        starts = first.nonzero()[:, 0]
        within = torch.arange(count) - starts[torch.cumsum(first.long(), 0) - 1]
        run = torch.cumsum((first | (within % chunk == 0)).long(), 0) - 1  # consecutive run ids
        rank = torch.randperm(int(run[-1]) + 1, generator=generator)
        rows = torch.argsort(rank[run] * count + torch.arange(count))
    # one window per batch: length_sorted_batches then makes it exactly one batch, rows as drawn
    batches = list(rows.split(batch_size))
    for i in torch.randperm(len(batches), generator=generator).tolist():
        yield {name: value[batches[i]] for name, value in split.items()}


def users_per_batch(train: dict[str, torch.Tensor], users: torch.Tensor, order: str, batch_size: int,
                    sort_window: int, seed: int, chunk: int) -> float:
    """The mean count of distinct users in one epoch's training batches under `order` (for the table)."""
    from training.steps import length_sorted_batches

    split = {"item_seq": train["item_seq"], "target": users}  # the batches fit trains on, users as targets
    batches = length_sorted_batches(batch_windows(split, users, order, batch_size, sort_window,
                                                  torch.Generator().manual_seed(seed), chunk), batch_size,
                                    shuffle=True)
    counts = [len(torch.unique(b["target"])) for b in batches]
    return float(np.mean(counts))


def train(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="train_mode_gap.py train")
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, help="JSON: settings, per-epoch history and test metrics")
    parser.add_argument("--loss", default="token", choices=LOSSES)
    parser.add_argument("--order", default="global", choices=ORDERS)
    parser.add_argument("--chunk", type=int, default=25, help="--order chunked: rows of one user per run")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--time-budget-s", type=float, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = np.load(args.data)
    info = json.loads(str(data["info"]))
    settings = TrainConfig.from_dict({
        "model": "sasrec", "dataset": info["dataset"], "max_len": info["max_len"], "train_mode": info["train_mode"],
        "window_stride": info["window_stride"], "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "epochs": args.epochs, "patience": args.patience, "time_budget_s": args.time_budget_s,
        "monitor": "ndcg@10"})
    config = MODELS["sasrec"].config_class.from_data(settings.model_config, DataFacts(settings.max_len))
    torch.manual_seed(settings.seed)  # as training.loop: the initial weights, then rank 0's stream
    model = create_model("sasrec", config, info["n_items"], None)
    torch.manual_seed(worker_seed(settings, rank=0, epoch=0))
    splits = {split: {key[len(split) + 2:]: torch.as_tensor(data[key], dtype=torch.int64)
                      for key in data.files if key.startswith(f"{split}__")} for split in SPLITS}
    users = torch.as_tensor(data["train_user"], dtype=torch.int64)
    generator = torch.Generator().manual_seed(settings.seed)
    epochs = EpochData(
        train_windows=lambda epoch: batch_windows(splits["train"], users, args.order, settings.batch_size,
                                                  settings.sort_window, generator, args.chunk),
        eval_windows=lambda split: windows(splits[split], EVAL_SORT_WINDOW * settings.eval_batch_size, None),
        batch_size=settings.batch_size)
    trainer_model = WindowMeanLoss(model) if args.loss == "window" else LossModel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    progress = Progress()
    started = time.perf_counter()
    final = fit(model, trainer_model, optimizer, grad_scaler(settings.precision, torch.device("cpu")), settings,
                epochs, progress, weights_copy(model), Reporting(line=lambda line: print(line, flush=True)))
    result = {"argv": argv, "export": info, "settings": settings.to_dict(), "model_config": dataclasses.asdict(config),
              "users_per_batch": users_per_batch(splits["train"], users, args.order, settings.batch_size,
                                                 settings.sort_window, settings.seed, args.chunk),
              "history": progress.history, "wall_s": time.perf_counter() - started, **final}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    history = progress.history
    print(f"best val ndcg@10 {final['val_ndcg@10']:.4f} at epoch {final['best_epoch']} of {final['epoch']} "
          f"({final['stop_reason']}); test ndcg@10 {final['test_ndcg@10']:.4f} hr@10 {final['test_hr@10']:.4f} "
          f"masked ndcg@10 {final['test_masked_ndcg@10']:.4f}; train s {sum(m['train_s'] for m in history):.0f}, "
          f"until best {sum(m['train_s'] for m in history[:final['best_epoch']]):.0f}; "
          f"{history[0]['steps']} steps/epoch; {result['users_per_batch']:.1f} users per batch", flush=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = {"export": export, "train": train}.get(argv[0] if argv else "")
    if command is None:
        print(__doc__)
        return 2
    return command(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
