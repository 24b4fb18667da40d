"""What a run leaves behind: its record in `runs`, its item vectors in `item_vectors`, its learning curves.

runs          one row per run id (a resumed run replaces its row): settings, per-epoch metrics and test
              metrics as JSON, the table versions read, timing and throughput.
item_vectors  (run_id, item_id, vector FixedSizeList<float32>[D]): the trained item representations
              (`item_representations()`), queried like the raw embeddings. A table holds one width D:
              runs with another width go to item_vectors_<D> (the run record names the table).
"""
from __future__ import annotations

import io
import json
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from featurestore import store
from featurestore.store import INDEX_MIN_ROWS
from featurestore.sequences import sql_string

RUNS = "runs"
VECTORS = "item_vectors"
# The models score users against items by dot product, so that is the metric the index ranks by.
VECTOR_METRIC = "dot"

RUNS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("model", pa.string()),
        pa.field("status", pa.string()),  # finished | failed
        pa.field("error", pa.string()),
        pa.field("started_at", pa.timestamp("us", tz="UTC")),
        pa.field("finished_at", pa.timestamp("us", tz="UTC")),
        pa.field("config", pa.string()),  # JSON: the training settings and the resolved model config
        pa.field("epochs", pa.string()),  # JSON: one metrics dict per epoch
        pa.field("epochs_run", pa.int32()),
        pa.field("best_epoch", pa.int32()),
        pa.field("stop_reason", pa.string()),  # epochs | patience (early stop) | time budget | target (stop_at)
        pa.field("restored_at", pa.list_(pa.int32())),  # epochs training restarted from (failures, --resume)
        pa.field("monitor", pa.string()),
        pa.field("best_value", pa.float64()),  # the monitored validation metric at the best epoch
        pa.field("test_metrics", pa.string()),  # JSON: test HR/NDCG/MRR of the best epoch's weights
        pa.field("db_uri", pa.string()),
        pa.field("items_version", pa.int64()),
        pa.field("interactions_version", pa.int64()),
        pa.field("sequences_version", pa.int64()),
        pa.field("run_dir", pa.string()),
        pa.field("checkpoint", pa.string()),  # the latest checkpoint (it holds the best weights too)
        pa.field("plot", pa.string()),
        pa.field("vectors_table", pa.string()),
        pa.field("wall_time_s", pa.float64()),  # this invocation, Ray start-up and result writing included
        pa.field("train_time_s", pa.float64()),  # sum of epoch times over all attempts' kept epochs
        pa.field("mean_epoch_s", pa.float64()),
        pa.field("sequences_per_s", pa.float64()),  # training throughput, all workers together
        pa.field("sequences_per_s_per_worker", pa.float64()),
        pa.field("num_workers", pa.int32()),
        pa.field("worker_nodes", pa.list_(pa.string())),  # the Ray node id of each worker, in rank order
        pa.field("n_items", pa.int32()),
        pa.field("n_parameters", pa.int64()),
    ]
)


def now() -> datetime:
    return datetime.now(timezone.utc)


def ensure_runs_table(db) -> None:
    """The `runs` table with every field, created before runs that write it at once start."""
    store.add_missing_fields(db, RUNS, RUNS_SCHEMA)
    store.ensure_table(db, RUNS, RUNS_SCHEMA)


def write_run(db, record: dict) -> None:
    """Insert or replace the run's row; missing fields are null."""
    row = {field.name: record.get(field.name) for field in RUNS_SCHEMA}
    ensure_runs_table(db)
    store.upsert(db, RUNS, pa.Table.from_pylist([row], schema=RUNS_SCHEMA), "run_id")


def read_runs(db):
    """The `runs` table as a DataFrame with config, epochs and test_metrics decoded."""
    frame = store.open_table(db, RUNS).to_pandas()
    for column in ("config", "epochs", "test_metrics"):
        frame[column] = frame[column].map(json.loads, na_action="ignore")
    return frame


def vectors_schema(dim: int) -> pa.Schema:
    return pa.schema([pa.field("run_id", pa.string(), nullable=False), pa.field("item_id", pa.string(), nullable=False),
                      pa.field("vector", pa.list_(pa.float32(), dim))])


def vector_dim(db, table_name: str) -> int | None:
    """The vector width an existing vectors table holds (None if there is no such table)."""
    table = store.open_table(db, table_name, required=False)
    return None if table is None else table.schema.field("vector").type.list_size


def vectors_table_for(db, dim: int) -> str:
    """item_vectors, unless it holds vectors of another width: then item_vectors_<dim>."""
    return VECTORS if vector_dim(db, VECTORS) in (None, dim) else f"{VECTORS}_{dim}"


def check_vectors_table(db, table_name: str, dim: int) -> None:
    """Fail before training if the run's vectors cannot go into the table."""
    existing = vector_dim(db, table_name)
    if existing not in (None, dim):
        raise store.StoreError(f"table {table_name!r} holds {existing}-d vectors; this model's item representations "
                               f"are {dim}-d: pass another vectors table (e.g. --vectors-table {table_name}_{dim})")


def ensure_vectors_table(db, table_name: str, dim: int):
    """The vectors table, created before training (runs that end at once then only add to it), or an error
    before training where it holds vectors of another width."""
    check_vectors_table(db, table_name, dim)
    return store.ensure_table(db, table_name, vectors_schema(dim))


def write_item_vectors(db, table_name: str, run_id: str, item_ids, vectors: np.ndarray) -> bool:
    """Replace the run's vectors in the table; build or refresh its ANN index once it is large enough.

    Returns whether the table has a vector index.
    """
    dim = vectors.shape[1]
    data = pa.table([pa.array([run_id] * len(item_ids), pa.string()), pa.array(list(item_ids), pa.string()),
                     pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float32).ravel()), dim)],
                    schema=vectors_schema(dim))
    table = ensure_vectors_table(db, table_name, dim)
    table.delete(f"run_id = {sql_string(run_id)}")
    table.add(data)
    # run_id gets a scalar index too: every query of these vectors filters by run
    return bool(store.ensure_indexes(table, ["vector"], VECTOR_METRIC, INDEX_MIN_ROWS, scalar_columns=["run_id"]))


def learning_curves_png(history: list[dict], monitor_key: str, title: str) -> bytes:
    """Loss parts and validation metrics per epoch, best epoch marked: a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    epochs = [m["epoch"] for m in history]
    figure, (losses, metrics) = plt.subplots(1, 2, figsize=(11, 4))
    parts = [n for n in history[0] if n.startswith("loss_")]
    for name in ["loss"] + (parts if len(parts) > 1 else []):  # one part is the total itself
        losses.plot(epochs, [m[name] for m in history], marker=".", label=name)
    losses.set(xlabel="epoch", ylabel="training loss (mean per sequence)")
    for name in dict.fromkeys(["val_hr@10", "val_ndcg@10", monitor_key]):
        if name in history[0]:
            metrics.plot(epochs, [m[name] for m in history], marker=".", label=name)
    best = max(history, key=lambda m: m[monitor_key])
    metrics.axvline(best["epoch"], color="grey", linestyle=":", label=f"best epoch {best['epoch']}")
    metrics.set(xlabel="epoch", ylabel="validation (full ranking)")
    for axes in (losses, metrics):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.legend(fontsize=8)
        axes.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()
