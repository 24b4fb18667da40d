"""What a run reads from the feature store: pinned table versions, checked up front, and the Ray datasets.

The driver opens each table once and keeps that version: the sequences go to Ray Data at that version
(`read_lance(..., version=)`), so a concurrent import cannot change a run half way, and the run record
names exactly what was read. Problems with the store are raised here, before any worker starts.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import pyarrow.compute as pc

from featurestore import movielens, objectstore, store
from featurestore.interactions import import_interactions
from featurestore.sequences import SEQUENCES, SPLITS, ItemIndex, build_sequences, make_examples, max_gap_s, split_counts
from training.resources import DATA_TASK_CPUS

# The flow that writes each table, for the error message when it is missing or empty.
WRITTEN_BY = {
    store.ITEMS: "flows/encode_items.py",
    store.INTERACTIONS: "flows/import_interactions.py",
    SEQUENCES: "flows/import_interactions.py",
}
SEQUENCE_COLUMNS = ["user_id", "item_idx", "timestamps", "first_timestamp"]  # user_id: test examples' user_key
BLOCK_BYTES = 32 * 1024**2  # target size of a block of examples
EXAMPLE_BYTES_PER_POSITION = 3 * 8  # item_seq, time_seq (, target_seq): int64 per history position
BLOCKS_PER_WORKER = 4
MATERIALIZE_SHARE = 0.25  # of the object store: the splits held at once, up to this size, are materialized


@dataclass(frozen=True)
class StoreSnapshot:
    """The tables a run reads, at the versions it reads them, and what they hold."""

    db_uri: str
    versions: dict[str, int]  # table -> Lance version
    sequences_uri: str
    users: int
    n_items: int
    counts: dict[str, int]  # featurestore.sequences.split_counts at max_len
    max_gap_s: int | None  # the largest gap between consecutive training items, when a model asked for it

    def check_unchanged(self, db, name: str) -> None:
        """Tables read through LanceDB's latest version (items: index, features) must still be the pinned one."""
        now = store.open_table(db, name).version
        if now != self.versions[name]:
            raise store.StoreError(f"table {name!r} changed while the run read it (version {self.versions[name]} "
                                   f"-> {now}): start the run again once the writer is done")

    def train_examples(self, mode: str) -> int:
        return self.counts[f"train_examples_{mode}"]


def open_required(db, name: str):
    """The table, or a StoreError naming the flow that creates it."""
    table = store.open_table(db, name, required=False)
    if table is None:
        raise store.StoreError(f"table {name!r} does not exist in {db.uri}: run {WRITTEN_BY[name]} first")
    return table


def interaction_sources(db) -> set[str]:
    """The sources (built-in names or file paths) the interactions table holds."""
    table = store.open_table(db, store.INTERACTIONS, required=False)
    if table is None:
        return set()
    return set(table.to_lance().to_table(columns=["source"]).column("source").unique().to_pylist())


def ensure_dataset(db, dataset: str) -> None:
    """The store must hold `dataset`'s interactions and no other source's. A built-in data set
    (ml-1m, ml-100k) is built into a store without interactions: items encoded (if absent),
    interactions imported, sequences built. A store is never changed once it holds interactions."""
    sources = interaction_sources(db)
    if not sources and dataset in movielens.SOURCES:
        from featurestore.encode import encode_catalog

        if store.ITEMS not in store.table_names(db):
            print("\n".join(encode_catalog(dataset, db_uri=str(db.uri)).lines()), flush=True)
        print(import_interactions(db, dataset), flush=True)
        print(build_sequences(db), flush=True)
    elif sources != {dataset}:
        held = sorted(sources) or "no interactions"
        raise store.StoreError(f"--dataset {dataset!r}: the store {db.uri} holds {held}; give each data set "
                               f"its own --db (built-in data sets are built into an empty one: "
                               f"{sorted(movielens.SOURCES)})")


def snapshot_store(db, max_len: int, train_mode: str, num_workers: int, stride: int | None = None,
                   max_gap: bool = False) -> tuple[StoreSnapshot, ItemIndex]:
    """Pin the versions of items, interactions and sequences and check they can train a model.

    `max_gap`: also find the largest gap between consecutive training items (a model's StoreNeeds asks).
    """
    tables = {}
    for name in WRITTEN_BY:  # in the order the flows create them: the first gap is the one to fix
        tables[name] = open_required(db, name)
        if tables[name].count_rows() == 0:
            raise store.StoreError(f"table {name!r} in {db.uri} is empty: run {WRITTEN_BY[name]} first")
    versions = {name: int(table.version) for name, table in tables.items()}
    index = ItemIndex.from_db(db)
    sequences = tables[SEQUENCES].to_lance()  # one Lance dataset object = one version, read consistently
    rows = sequences.to_table(columns=["item_idx", "timestamps"])
    counts = split_counts(rows, max_len, stride)
    largest = pc.max(pc.list_flatten(rows.column("item_idx"))).as_py() or 0
    if largest > len(index):
        raise store.StoreError(f"sequences refer to item index {largest} but items holds {len(index)} items: "
                               f"the items changed after the sequences were built; re-run {WRITTEN_BY[SEQUENCES]}")
    if counts[f"train_examples_{train_mode}"] < num_workers or counts["valid_examples"] == 0:
        raise store.StoreError(
            f"the sequences table (version {sequences.version}) yields {counts[f'train_examples_{train_mode}']} "
            f"training examples (train_mode {train_mode!r}) and {counts['valid_examples']} validation examples "
            f"for {num_workers} worker(s): every worker needs a training example and validation needs users "
            f"with >= 3 interactions; import more interactions with {WRITTEN_BY[SEQUENCES]}")
    snapshot = StoreSnapshot(
        db_uri=str(db.uri), versions=versions, sequences_uri=sequences.uri, users=rows.num_rows,
        n_items=len(index), counts=counts, max_gap_s=max_gap_s(rows, "train") if max_gap else None,
    )
    return snapshot, index


def users_per_block(snapshot: StoreSnapshot, max_len: int, split: str, mode: str, num_workers: int) -> int:
    """Users per make_examples call: blocks near BLOCK_BYTES ("last" fans a user out into many examples),
    and at least BLOCKS_PER_WORKER blocks per worker so every worker gets a share of each split."""
    examples = snapshot.train_examples(mode) if split == "train" else snapshot.counts[f"{split}_examples"]
    examples_per_user = max(1.0, examples / max(snapshot.users, 1))
    by_size = BLOCK_BYTES / EXAMPLE_BYTES_PER_POSITION / max_len / examples_per_user
    by_count = math.ceil(snapshot.users / (BLOCKS_PER_WORKER * num_workers))
    return max(1, min(int(by_size), by_count))


def split_bytes(snapshot: StoreSnapshot, max_len: int, split: str, mode: str) -> int:
    examples = snapshot.train_examples(mode) if split == "train" else snapshot.counts[f"{split}_examples"]
    return examples * max_len * EXAMPLE_BYTES_PER_POSITION


def split_key(snapshot: StoreSnapshot, split: str, max_len: int, train_mode: str, num_workers: int,
              stride: int) -> tuple:
    """Everything that decides a split's examples and blocks: the pinned sequences, L, the workers (blocks per
    worker) and, for "train" only, the mode and (mode all) the stride. Runs that differ only in their model,
    optimizer or batch size read the same splits, and validation and test are the same in either mode."""
    key = (snapshot.sequences_uri, snapshot.versions[SEQUENCES], split, max_len, num_workers)
    return key + ((train_mode, stride if train_mode == "all" else None) if split == "train" else ())


def split_keys(snapshot: StoreSnapshot, max_len: int, train_mode: str, num_workers: int,
               stride: int) -> dict[str, tuple]:
    return {split: split_key(snapshot, split, max_len, train_mode, num_workers, stride) for split in SPLITS}


def shared_splits(layouts: Iterable[tuple[StoreSnapshot, int, str, int, int]],
                  held: Mapping[tuple, object] | None = None) -> dict[tuple, object]:
    """`held` and the Ray datasets of every other split of the (snapshot, max_len, train_mode, num_workers,
    stride) layouts, once per distinct split_key: a sweep computes them before its trials, which then start
    without computing any.

    The result maps keys to Ray datasets, which hold object refs only: the examples of a materialized split
    live in Ray's object store (on the nodes that computed them, spilled to disk under pressure) and the
    holder's memory does not grow with the data. What the budget leaves out stays a plan, streamed every epoch.
    """
    import ray

    held, plans = dict(held or {}), {}
    for snapshot, max_len, train_mode, num_workers, stride in layouts:
        for split, key in split_keys(snapshot, max_len, train_mode, num_workers, stride).items():
            if key not in plans and key not in held:
                users = users_per_block(snapshot, max_len, split, train_mode, num_workers)
                plans[key] = (example_plan(snapshot, split, max_len, train_mode, stride, users),
                              split_bytes(snapshot, max_len, split, train_mode))
    # the splits held at once share one budget; the smallest are computed first, so the most of them fit
    budget, kept = MATERIALIZE_SHARE * ray.cluster_resources().get("object_store_memory", 0), []
    for key, (_, size) in sorted(plans.items(), key=lambda entry: entry[1][1]):
        if size <= budget:
            kept.append(key)
            budget -= size
    datasets = held | {key: dataset for key, (dataset, _) in plans.items()}
    with ThreadPoolExecutor(max(len(kept), 1)) as pool:  # at once: each execution mostly waits on scheduling
        datasets.update(zip(kept, pool.map(lambda key: datasets[key].materialize(), kept)))
    return datasets


def example_plan(snapshot: StoreSnapshot, split: str, max_len: int, train_mode: str, stride: int, users: int):
    """A lazy Ray dataset of the split's leave-one-out examples from the pinned sequences, `users` a block."""
    import ray

    sequences = ray.data.read_lance(snapshot.sequences_uri, version=snapshot.versions[SEQUENCES],
                                    columns=SEQUENCE_COLUMNS, num_cpus=DATA_TASK_CPUS,
                                    storage_options=objectstore.storage_options(snapshot.sequences_uri))
    examples = sequences.map_batches(
        make_examples, fn_kwargs={"split": split, "max_len": max_len, "mode": train_mode, "stride": stride},
        batch_format="pyarrow", batch_size=users, num_cpus=DATA_TASK_CPUS)
    # one make_examples call = one block (Ray would otherwise merge small outputs up to 128 MiB)
    examples.context.target_max_block_size = BLOCK_BYTES
    examples.context.enable_progress_bars = False  # one line per epoch is the run's output
    return examples


def example_datasets(snapshot: StoreSnapshot, max_len: int, train_mode: str, num_workers: int, stride: int,
                     shared: Mapping[tuple, object] | None = None) -> dict:
    """{"train", "valid", "test"}: Ray datasets of leave-one-out examples from the pinned sequences.

    The splits `shared` holds (shared_splits of a sweep, at the same table versions) are taken from it; the
    others are computed here, before the workers start: a split that fits in MATERIALIZE_SHARE of the object
    store is materialized, so epochs stream it from memory instead of re-reading and re-slicing the table. A
    larger split (train_mode "last" on a big data set) streams every epoch.
    """
    datasets = shared_splits([(snapshot, max_len, train_mode, num_workers, stride)], held=shared)
    return {split: datasets[key] for split, key in split_keys(snapshot, max_len, train_mode, num_workers,
                                                              stride).items()}


def data_config():
    """Training data split evenly (DDP needs the same number of steps on every worker: Ray's even split
    drops up to num_workers - 1 rows per epoch for that); the evaluation splits shared out whole. One worker reads
    every split whole, through no split coordinator (each one an actor a run would wait on to start)."""
    from ray.train import DataConfig

    class EvenTrainCompleteEval(DataConfig):
        def __init__(self):
            super().__init__(datasets_to_split=["train"])

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            if world_size == 1:  # nothing to split: plain iterators, not a SplitCoordinator actor per split to start
                return [{name: self._for_ingest(name, ds).iterator() for name, ds in datasets.items()}]
            train = {name: ds for name, ds in datasets.items() if name == "train"}
            shards = super().configure(train, world_size, worker_handles, worker_node_ids, **kwargs)
            for name, ds in datasets.items():
                if name == "train":
                    continue
                for rank, split in enumerate(self._for_ingest(name, ds).streaming_split(
                        world_size, equal=False, locality_hints=worker_node_ids)):
                    shards[rank][name] = split
            return shards

        def _for_ingest(self, name, ds):
            """A copy named `name` with the ingest execution options, as DataConfig.configure prepares one."""
            ds = ds.copy(ds)
            if ds.name is None:
                ds.set_name(name)
            ds.context.execution_options = self._resolve_execution_options(name)
            return ds

    return EvenTrainCompleteEval()
