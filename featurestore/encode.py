"""The item-encoding pipeline, all in Ray: catalog read and parse (tasks) -> text and content hash (tasks) ->
joins on item_id that find new and changed rows -> image fetch (tasks) -> encoder actor pools -> Lance fragment
writers (tasks); the driver commits what they staged and merges it into the LanceDB table (`EncodeJob`).

`flows/encode_items.py` is a thin command line over `encode_catalog`; everything here is importable and tested.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import string
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featurestore import objectstore, store
from featurestore.catalogs import CatalogSource, open_catalog
from featurestore.images import ImagePolicy
from featurestore.raycluster import (DATA_TASK_CPUS, SHUFFLE_CPU_RESERVE, ResourcePlanError, cpus_beside_ray_data,
                                     ensure_ray)

DEFAULT_TEMPLATE = "{title}|Categories: {categories}|{description}"
# Stored before the content hash of an item whose image failed transiently: the stored hash then never equals a
# fresh one, so the next run plans the item as changed and fetches its image again.
RETRY_PREFIX = "retry:"


def steady_rate(start: tuple[float, int] | None, encoded: int, end: float, stream_s: float) -> float | None:
    """Items/s encoded after the first results that held encoded items (`start`: when they arrived, how many
    they held) until the stream's `end`; None where that window is under half the stream: results that came in
    a burst at the end (as a small catalog's do) measure the burst, not the pipeline (a 38 s run once showed
    21,834 items/s "steady" of 44 items/s overall)."""
    if start is None or encoded <= start[1] or end - start[0] < stream_s / 2:
        return None
    return (encoded - start[1]) / (end - start[0])


def rules_prefix(policy: ImagePolicy) -> str:
    """Stored before the content hash of an item whose image a rule refused (the roots, the private-address rule,
    the caps), with a digest of those rules: a run under the same rules finds the item unchanged, a run whose
    flags changed them (a wider --image-root, say) fetches its image again."""
    return f"rules-{policy.rules_fingerprint}:"


@dataclass(frozen=True)
class TextTemplate:
    """`|`-separated parts such as "Categories: {categories}"; a part whose fields are all empty is left out."""

    template: str = DEFAULT_TEMPLATE
    separator: str = ". "

    def render(self, row: dict) -> str:
        values = {
            "item_id": row["item_id"],
            "title": row["title"] or "",
            "description": row["description"] or "",
            "categories": ", ".join(row["categories"] or []),
        }
        parts = []
        for part in self.template.split("|"):
            fields = [name for _, name, _, _ in string.Formatter().parse(part) if name]
            unknown = [f for f in fields if f not in values]
            if unknown:
                raise ValueError(f"text template field {unknown[0]!r} is not one of {', '.join(values)}")
            if any(values[f] for f in fields):
                parts.append(part.format(**values).strip())
        return self.separator.join(parts)


def items_schema(text_dim: int, image_dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("text", pa.string()),
            pa.field("categories", pa.list_(pa.string())),
            pa.field("image_ref", pa.string()),
            pa.field("content_hash", pa.string()),
            pa.field("text_emb", pa.list_(pa.float32(), text_dim)),  # null when the item has no text
            pa.field("image_emb", pa.list_(pa.float32(), image_dim)),  # null when it has no usable image
            pa.field("text_encoder", pa.string()),
            pa.field("text_encoder_version", pa.string()),
            pa.field("image_encoder", pa.string()),
            pa.field("image_encoder_version", pa.string()),
            pa.field("encoded_at", pa.timestamp("us", tz="UTC")),
        ]
    )


def content_hash(text: str, image_ref: str | None, image_bytes: bytes | None, text_version: str, image_version: str) -> str:
    """What decides whether an item must be encoded again: its text, its image (reference or bytes), the encoders."""
    digest = hashlib.sha1()
    image_key = hashlib.sha1(image_bytes).hexdigest() if image_bytes is not None else (image_ref or "")
    for part in (text, image_key, text_version, image_version):
        digest.update(part.encode())
        digest.update(b"\x1f")
    return digest.hexdigest()


@dataclass
class EncodeSettings:
    text_model: str
    image_model: str
    template: TextTemplate = field(default_factory=TextTemplate)
    batch_size: int = 64
    actors: int | None = None  # per encoder stage; None: one per GPU, or one on a CPU-only cluster
    gpus_per_actor: float | None = None  # None: use GPUs if the cluster has them
    images: ImagePolicy = field(default_factory=ImagePolicy)  # the catalog's folder is added as a root per run
    index_min_rows: int = store.INDEX_MIN_ROWS
    # The driver commits what the writers staged at least every commit_rows rows or commit_seconds, so a killed
    # run keeps what it finished; each commit is a version of the staging tables, not of the items table.
    commit_rows: int = 50_000
    commit_seconds: float = 30.0


@dataclass
class EncodeSummary:
    table: str
    input: int = 0
    encoded: int = 0
    unchanged: int = 0
    rejected_whole: int = 0
    image_failures: int = 0
    image_failures_transient: int = 0  # of image_failures: retried on the next run
    encode_seconds: float = 0.0  # the streaming pass: read, plan, encode, stage, commit
    steady_items_per_s: float | None = None  # None: not measurable (steady_rate)
    first_batch_seconds: float = 0.0  # start-up: scheduling, the plan's joins, actor creation, model loading
    indexed: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds: recover, stream, commit, merge, index
    actor_nodes: dict[str, list[str]] = field(default_factory=dict)  # encoder stage -> Ray node ids it ran on

    def add(self, written: dict) -> None:
        """Count one writer result (`stage_batch`)."""
        self.encoded += written["encoded"]
        self.image_failures += written["image_failures"]
        self.image_failures_transient += written["image_failures_transient"]
        for tag in written["nodes"]:
            stage, node = tag.split(":", 1)
            self.actor_nodes[stage] = sorted({*self.actor_nodes.get(stage, []), node})
        self.unchanged += written["unchanged"]
        self.rejected_whole += written["rejected"] + written["still_rejected"]
        self.input += written["rows"] + written["unchanged"] + written["still_rejected"]

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "items_per_s": self.items_per_s}

    @property
    def items_per_s(self) -> float:
        return self.encoded / self.encode_seconds if self.encode_seconds else 0.0

    def lines(self) -> list[str]:
        out = [
            f"table {self.table}: input {self.input} = encoded {self.encoded} + unchanged {self.unchanged}"
            f" + rejected whole {self.rejected_whole}; image failures (encoded from text) {self.image_failures}"
            f" ({self.image_failures_transient} transient: retried on the next run)",
        ]
        if self.encoded:
            steady = ("steady state not measured: the results came in a burst" if self.steady_items_per_s is None
                      else f"{self.steady_items_per_s:.1f} items/s steady state")
            out.append(f"encoded {self.encoded} items in {self.encode_seconds:.1f}s ({self.items_per_s:.1f} items/s "
                       f"overall, {steady}, {self.first_batch_seconds:.1f}s to the first batch)")
        else:
            out.append("nothing to encode: every item is unchanged since the last run")
        if self.indexed:
            out.append(f"ANN index built/updated on: {', '.join(self.indexed)}")
        if self.actor_nodes:
            out.append("encoder actors ran on: " + ", ".join(
                f"{stage} {len(nodes)} node(s)" for stage, nodes in sorted(self.actor_nodes.items())))
        out.append("phases (wall s): " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in self.phases.items()))
        return out


@dataclass(frozen=True)
class ActorResources:
    actors: int
    cpus: float
    gpus: float
    torch_threads: int


def plan_resources(cluster_cpus: float, cluster_gpus: float, stages: int, actors: int | None, gpus_per_actor: float | None) -> ActorResources:
    """CPU/GPU requests for each encoder stage's actor pool that always leave CPU for the plan's joins and the
    fetch/read tasks (featurestore.raycluster: a pool holding every CPU hangs Ray Data); a ResourcePlanError for a
    plan that cannot."""
    if gpus_per_actor is None:
        gpus_per_actor = min(1.0, cluster_gpus / stages) if cluster_gpus else 0.0
    if gpus_per_actor > 0:
        actors = actors or max(1, int(cluster_gpus // (gpus_per_actor * stages)))
        if gpus_per_actor * actors * stages > cluster_gpus + 1e-9:
            raise ResourcePlanError(
                f"{stages} encoder stage(s) x {actors} actor(s) x {gpus_per_actor} GPU need "
                f"{gpus_per_actor * actors * stages:g} GPUs; the cluster has {cluster_gpus:g}"
            )
    actors = actors or 1
    cpus = min(1.0, cpus_beside_ray_data(cluster_cpus, actors * stages, "encoding", SHUFFLE_CPU_RESERVE))
    if cpus < 0.1:
        raise ResourcePlanError(
            f"{actors} actor(s) per stage x {stages} stage(s) leave no CPU for the tasks that feed them on a "
            f"{cluster_cpus:g}-CPU cluster: use fewer --actors"
        )
    # Torch threads per CPU actor: the cores over the stage's actors, not over every stage's. The stages are
    # rarely busy together (on 2 cores the image stage was busy 100 % and the text stage 32 %), so splitting
    # the cores between them left the bottleneck stage on one thread: 22.3 -> 30.6 images/s with 2 threads
    # (bench/results/encode_throughput.md).
    threads = max(1, int(cluster_cpus // actors)) if gpus_per_actor == 0 else 1
    return ActorResources(actors=actors, cpus=round(cpus, 2), gpus=gpus_per_actor, torch_threads=threads)


class _Embedder:
    """Ray Data actor: one encoder, whose model loads in a background thread from the actor's start, so that the
    load overlaps the plan's joins instead of holding up the first batch (7-9 s a model on 2 cores); the first
    batch that needs the model waits for the load and gets its error, if it failed."""

    modality: str

    def __init__(self, model_name: str, torch_threads: int):
        from concurrent.futures import ThreadPoolExecutor

        import ray

        self.model_name, self.torch_threads, self.threads_set = model_name, torch_threads, False
        self.node_id = ray.get_runtime_context().get_node_id()
        self.loading = ThreadPoolExecutor(1, thread_name_prefix="model-load").submit(
            self._create_encoder, model_name, self.modality)

    @staticmethod
    def _create_encoder(model_name: str, modality: str):
        from encoders import create_encoder

        return create_encoder(model_name, modality)

    def tagged(self, batch: pa.Table) -> pa.Table:
        """The batch with the node this actor runs on (`<modality>_node`): the run's summary says where each
        encoder stage ran."""
        return batch.append_column(f"{self.modality}_node", pa.array([self.node_id] * batch.num_rows, pa.string()))

    def load(self):
        encoder = self.loading.result()
        if not self.threads_set:  # in the thread that runs the batches: OpenMP's thread count is per thread
            import torch

            torch.set_num_threads(self.torch_threads)
            self.threads_set = True
        return encoder


def _vectors(matrix: np.ndarray, valid: np.ndarray, dim: int) -> pa.Array:
    """(n, dim) float32 + validity mask -> FixedSizeList<float32>[dim] with nulls where invalid."""
    values = pa.array(np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~valid))


def _to_encode(batch: pa.Table) -> np.ndarray:
    return np.asarray(batch.column("verdict").to_numpy(zero_copy_only=False) == ENCODE)


class TextEmbedder(_Embedder):
    modality = "text"

    def __init__(self, model_name: str, torch_threads: int, dim: int):
        super().__init__(model_name, torch_threads)
        self.dim = dim

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        has_text = _to_encode(batch) & np.array([bool(t) for t in texts], dtype=bool)
        embeddings = np.zeros((batch.num_rows, self.dim), dtype=np.float32)
        if has_text.any():
            embeddings[has_text] = self.load().encode([t for t, keep in zip(texts, has_text) if keep])
        return self.tagged(batch.append_column("text_emb", _vectors(embeddings, has_text, self.dim)))


class ImageEmbedder(_Embedder):
    modality = "image"

    def __init__(self, model_name: str, torch_threads: int, dim: int, input_size: int):
        super().__init__(model_name, torch_threads)
        self.dim, self.input_size = dim, input_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        pixels = batch.column("pixels")
        has_image = np.asarray(pixels.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        embeddings = np.zeros((batch.num_rows, self.dim), dtype=np.float32)
        if has_image.any():
            size = self.input_size
            stacked = np.stack([np.frombuffer(p, np.uint8).reshape(size, size, 3)
                                for p in pixels.filter(pa.array(has_image)).to_pylist()])
            embeddings[has_image] = self.load().encode(stacked)
        # 150 KB a row: not carried further
        return self.tagged(batch.drop_columns(["pixels"]).append_column("image_emb",
                                                                         _vectors(embeddings, has_image, self.dim)))


# ------------------------------------------------------------------------------------------------ planning in Ray

ENCODE, REJECT, TALLY = "encode", "reject", "tally"
# What flows from the plan through the encoders to the writers: the rows to encode, the rows rejected whole and,
# per batch, one tally row counting the rows that need nothing (unchanged, or rejected before and unchanged).
WORK_SCHEMA = pa.schema([
    ("source", pa.string()), ("row", pa.int64()), ("item_id", pa.string()), ("text", pa.string()),
    ("categories", pa.list_(pa.string())), ("image_ref", pa.string()), ("image_bytes", pa.binary()),
    ("content_hash", pa.string()), ("verdict", pa.string()), ("reason", pa.string()),
    ("n_unchanged", pa.int64()), ("n_still_rejected", pa.int64()),
])


def prepare_rows(block: pa.Table, template: TextTemplate, text_version: str, image_version: str) -> pa.Table:
    """Ray Data batch function: each usable row's text and content hash."""
    texts, hashes = [], []
    for row in block.select(["item_id", "title", "description", "categories", "image_ref", "image_bytes",
                             "reject"]).to_pylist():
        text = "" if row["reject"] else template.render(row)
        texts.append(text)
        hashes.append(None if row["reject"] else
                      content_hash(text, row["image_ref"], row["image_bytes"], text_version, image_version))
    return block.append_column("text", pa.array(texts, pa.string())).append_column(
        "content_hash", pa.array(hashes, pa.string()))


KEYS_SCHEMA = pa.schema([("item_id", pa.string()), ("rank", pa.int64()), ("stored_hash", pa.string()),
                         ("rejected_hash", pa.string())])  # the plan's groupby input: one of the last three is set


def _usable_keys(block: pa.Table) -> pa.Table:
    usable = block.filter(pc.is_null(block.column("reject")))
    return pa.table([usable.column("item_id"), usable.column("rank"), pa.nulls(usable.num_rows, pa.string()),
                     pa.nulls(usable.num_rows, pa.string())], schema=KEYS_SCHEMA)


def retried_when(transient: bool, by_rule: bool) -> str:
    """How an image failure's reject record ends: when the image will be fetched again."""
    if transient:
        return "transient, retried on the next run"
    return "tried again once the flags change the rule" if by_rule else "permanent"


def classify(block: pa.Table, source: CatalogSource, rules: str) -> pa.Table:
    """Ray Data batch function over catalog rows joined with their id's first rank and stored hashes: WORK_SCHEMA
    rows (the ones to encode, the ones rejected whole) and one tally row for the rest. A stored hash matches
    the row's as it is or under `rules` (rules_prefix: the image rules of this run)."""
    def flag(condition) -> np.ndarray:
        return np.asarray(pc.fill_null(condition, False).to_numpy(zero_copy_only=False), dtype=bool)

    fresh = block.column("content_hash")
    # (cast: a join's output may hold large strings, which binary_join does not mix with a plain string)
    under_rules = pc.binary_join_element_wise(pa.scalar(rules), pc.cast(fresh, pa.string()), "")

    def matches(stored: str) -> np.ndarray:
        return flag(pc.or_kleene(pc.equal(block.column(stored), fresh), pc.equal(block.column(stored), under_rules)))

    rejected = flag(pc.is_valid(block.column("reject")))
    repeated = ~rejected & flag(pc.not_equal(block.column("rank"), block.column("first_rank")))
    usable = ~rejected & ~repeated
    unchanged = usable & matches("stored_hash")
    still_rejected = usable & ~unchanged & matches("rejected_hash")
    keep = ~(unchanged | still_rejected)
    reasons = block.column("reject").to_pylist()
    ids, first_ranks = block.column("item_id").to_pylist(), block.column("first_rank").to_pylist()
    for i in np.flatnonzero(repeated):  # rare: only their reasons are formatted row by row
        reasons[i] = f"item_id {ids[i]!r} repeats {source.where(first_ranks[i])}"
    work = block.filter(pa.array(keep))
    columns = {name: work.column(name) for name in WORK_SCHEMA.names[:8]}
    columns["verdict"] = pa.array(np.where(rejected | repeated, REJECT, ENCODE)[keep], pa.string())
    columns["reason"] = pa.array([r for r, k in zip(reasons, keep) if k], pa.string())
    columns["n_unchanged"] = columns["n_still_rejected"] = pa.nulls(work.num_rows, pa.int64())
    tally = {name: [None] for name in WORK_SCHEMA.names}
    tally.update(verdict=[TALLY], n_unchanged=[int(unchanged.sum())], n_still_rejected=[int(still_rejected.sum())])
    return pa.concat_tables([pa.Table.from_pydict(columns, schema=WORK_SCHEMA),
                             pa.Table.from_pydict(tally, schema=WORK_SCHEMA)])


def _keys(db, name: str, column: str, alias: str, where: tuple[str, str] | None = None):
    """KEYS_SCHEMA rows of table `name` (those whose where[0] column equals where[1]): item_id and `column` as
    `alias`, as a Ray dataset read by the workers; empty when the table is absent."""
    import ray

    if store.open_table(db, name, required=False) is None:
        return ray.data.from_arrow(KEYS_SCHEMA.empty_table())
    uri = store.table_uri(db, name)
    fragments = len(store.open_table(db, name).to_lance().get_fragments())
    ds = ray.data.read_lance(uri, columns=["item_id", column] + ([where[0]] if where else []),
                             storage_options=objectstore.storage_options(uri) or None,
                             ray_remote_args={"num_cpus": DATA_TASK_CPUS},
                             override_num_blocks=max(1, fragments))  # not split into 200 tiny blocks

    # Filtered and renamed in a batch function: Ray 2.60's rename_columns after a column-pruned read_lance
    # projects the table's full schema and fails on the columns it did not read.
    def keys(block: pa.Table) -> pa.Table:
        if where:
            block = block.filter(pc.equal(block.column(where[0]), where[1]))
        n = block.num_rows
        columns = {"item_id": block.column("item_id"), "rank": pa.nulls(n, pa.int64()),
                   "stored_hash": pa.nulls(n, pa.string()), "rejected_hash": pa.nulls(n, pa.string())}
        columns[alias] = block.column(column)
        return pa.table(columns, schema=KEYS_SCHEMA)

    return ds.map_batches(keys, batch_size=None, batch_format="pyarrow", num_cpus=DATA_TASK_CPUS)


# ------------------------------------------------------------------------------------------------- writing in Ray

STAGED_SUFFIX = "_staged"  # `items_staged`, `items_staged_rejects`: a run's encoded rows before they are merged


def stage_batch(batch: pa.Table, job: "StagingTarget") -> pa.Table:
    """Ray Data batch function, the pipeline's last: the batch's item rows and reject records written as Lance
    fragments of the staging tables (uncommitted), and one result row for the driver to commit and count."""
    from lance.fragment import write_fragments

    verdict = batch.column("verdict").to_pylist()
    work = batch.filter(pa.array([v != TALLY for v in verdict]))
    tallies = batch.filter(pa.array([v == TALLY for v in verdict]))
    items, rejects, counts = job.item_rows(work)
    counts.update(unchanged=int(pc.sum(tallies.column("n_unchanged")).as_py() or 0),
                  still_rejected=int(pc.sum(tallies.column("n_still_rejected")).as_py() or 0))
    fragments = {}
    for key, rows, uri in (("items", items, job.staged_uri), ("rejects", rejects, job.staged_rejects_uri)):
        written = write_fragments(rows, uri, schema=rows.schema, storage_options=job.storage_options or None) \
            if rows.num_rows else []
        fragments[key] = [json.dumps(f.to_json()) for f in written]
    nodes = sorted({f"{column[:-len('_node')]}:{node}" for column in batch.column_names if column.endswith("_node")
                    for node in batch.column(column).unique().to_pylist()})
    return pa.table({"items": [fragments["items"]], "rejects": [fragments["rejects"]], "nodes": [nodes],
                     **{name: [value] for name, value in counts.items()}})


@dataclass(frozen=True)
class StagingTarget:
    """What a writer task needs: where the staging tables are and how encoded batches become their rows."""

    staged_uri: str
    staged_rejects_uri: str
    storage_options: dict
    schema: pa.Schema
    text_encoder: tuple[str, str, int]  # name, version, dim
    image_encoder: tuple[str, str, int]
    encoded_at: datetime
    rules_prefix: str  # before the hash of an item whose image a rule refused

    def item_rows(self, work: pa.Table) -> tuple[pa.Table, pa.Table, dict]:
        """WORK_SCHEMA rows after the encoders -> (items rows, reject records, counts). Image failures keep their
        item (encoded from its text) and get a record; items with neither text nor image are rejected whole
        (stage "encode", with their hash: not retried while unchanged); rows rejected by the plan keep their
        reason (stage "read")."""
        n = work.num_rows
        verdict = np.asarray(work.column("verdict").to_numpy(zero_copy_only=False))
        encode = verdict == ENCODE
        has_text = encode & np.asarray(work.column("text_emb").is_valid().to_numpy(zero_copy_only=False), bool)
        has_image = encode & np.asarray(work.column("image_emb").is_valid().to_numpy(zero_copy_only=False), bool) \
            if "image_emb" in work.column_names else np.zeros(n, bool)
        errors = work.column("image_error").to_pylist() if "image_error" in work.column_names else [None] * n
        transient, by_rule = (work.column(c).to_pylist() if c in work.column_names else [False] * n
                              for c in ("image_transient", "image_by_rule"))
        keep = has_text | has_image
        hashes = [RETRY_PREFIX + h if t else self.rules_prefix + h if r else h
                  for h, t, r in zip(work.column("content_hash").to_pylist(), transient, by_rule)]
        failures = [f"{e} ({retried_when(t, r)})" if e else "" for e, t, r in zip(errors, transient, by_rule)]
        records = []
        for i, (source, row, item_id, reason) in enumerate(zip(*(work.column(c).to_pylist()
                                                                for c in ("source", "row", "item_id", "reason")))):
            where = {"source": source, "row": row, "item_id": item_id}
            if not encode[i]:
                records.append({**where, "stage": "read", "reason": reason})
            elif not keep[i]:
                records.append({**where, "stage": "encode", "content_hash": hashes[i], "reason":
                                f"no usable text or image ({failures[i] or 'the text template renders nothing'})"})
            elif errors[i]:
                records.append({**where, "stage": "image", "reason": f"{failures[i]}; encoded from its text only"})
        kept = work.filter(pa.array(keep))
        m = kept.num_rows
        text_name, text_version, text_dim = self.text_encoder
        image_name, image_version, image_dim = self.image_encoder
        image_emb = kept.column("image_emb") if "image_emb" in kept.column_names else \
            pa.nulls(m, pa.list_(pa.float32(), image_dim))
        columns = {
            **{name: kept.column(name) for name in ("item_id", "text", "categories", "image_ref")},
            "content_hash": pa.array([h for h, k in zip(hashes, keep) if k], pa.string()),
            "text_emb": kept.column("text_emb"), "image_emb": image_emb,
            "text_encoder": pa.array([text_name] * m, pa.string()),
            "text_encoder_version": pa.array([text_version] * m, pa.string()),
            "image_encoder": pa.array([image_name] * m, pa.string()),
            "image_encoder_version": pa.array([image_version] * m, pa.string()),
            "encoded_at": pa.array([self.encoded_at] * m, pa.timestamp("us", tz="UTC")),
        }
        image_failures = sum(r["stage"] == "image" for r in records)
        counts = {"encoded": m, "image_failures": image_failures,
                  "image_failures_transient": int(sum(bool(t) for t, e, k in zip(transient, errors, keep) if e and k)),
                  "rejected": len(records) - image_failures, "rows": n}
        return pa.Table.from_pydict(columns, schema=self.schema), store.rejects_table(records), counts


WRITE_BATCH_ROWS = 1024  # rows per writer call (at most): one fragment of each staging table


class EncodeJob:
    """One run of the encoding flow against one database table.

    The driver builds the Ray Data plan, commits what the writer tasks staged and merges it into the table; it
    never holds catalog rows or embeddings. Workers read and parse the catalog, find what changed by joins on
    item_id, encode, and write Lance fragments of `<table>_staged` (and `<table>_staged_rejects`), which the driver
    commits every `commit_rows` rows or `commit_seconds`. At the end one streamed merge_insert moves the staged rows
    into the table (an item's old row replaced in the same commit) and the staging tables are dropped. A run
    killed at any point leaves the table at its previous version and the staged rows committed so far; the next
    run merges those first, so their items are unchanged to its plan and are not encoded again.
    """

    def __init__(self, db, table: str, settings: EncodeSettings):
        from encoders import image_config, text_config

        self.db, self.table_name, self.settings = db, table, settings
        self.text_config = text_config(settings.text_model)
        self.image_config = image_config(settings.image_model)
        self.schema = items_schema(self.text_config.dim, self.image_config.dim)
        self.rejects_table = f"{table}_rejects" if table != store.ITEMS else store.ITEM_REJECTS
        self.staged = f"{table}{STAGED_SUFFIX}"
        self.staged_rejects = f"{table}{STAGED_SUFFIX}_rejects"
        self._check_existing_table()

    def _check_existing_table(self) -> None:
        existing = store.open_table(self.db, self.table_name, required=False)
        if existing is None:
            return
        for column in ("text_emb", "image_emb"):
            have, want = existing.schema.field(column).type, self.schema.field(column).type
            if have != want:
                raise store.StoreError(
                    f"table {self.table_name!r} holds {column} of type {have}, but the chosen encoder gives {want}; "
                    f"write to another --table or drop this one"
                )

    def plan(self, source: CatalogSource, cluster_cpus: float, rules: str):
        """The rows of the catalog as WORK_SCHEMA: read, parsed, text and hash added, and joined on item_id with
        the first rank of their id and the hashes stored in the table and its rejects.

        Two shuffles: one groupby over the keys alone (the catalog's (item_id, rank) and the stored hashes,
        as one union), then one join of the catalog's rows with its result. The catalog is read twice (for
        the keys and for the rows) rather than held in the object store between them.
        """
        from ray.data.aggregate import Max, Min

        s = self.settings
        rows = source.dataset().map_batches(
            prepare_rows, fn_args=(s.template, self.text_config.version, self.image_config.version),
            batch_size=None, batch_format="pyarrow", num_cpus=DATA_TASK_CPUS)
        partitions = max(2, int(cluster_cpus))
        keys = rows.map_batches(_usable_keys, batch_size=None, batch_format="pyarrow", num_cpus=DATA_TASK_CPUS).union(
            _keys(self.db, self.table_name, "content_hash", "stored_hash"),
            _keys(self.db, self.rejects_table, "content_hash", "rejected_hash", ("stage", "encode")))
        verdict_keys = keys.groupby("item_id", num_partitions=partitions).aggregate(
            Min("rank", alias_name="first_rank"), Max("stored_hash", alias_name="stored_hash"),
            Max("rejected_hash", alias_name="rejected_hash"))
        # The join's reduce tasks ask for DATA_TASK_CPUS, not Ray's default whole CPU: beside the encoder actors
        # one CPU is free, and whole-CPU reduces ran the partitions one after another (an 18-row catalog's plan
        # took 24 s on 2 cores).
        decided = rows.join(verdict_keys, "left_outer", num_partitions=partitions, on=("item_id",),
                            aggregator_ray_remote_args={"num_cpus": DATA_TASK_CPUS})
        return decided.map_batches(classify, fn_args=(source, rules), batch_size=None, batch_format="pyarrow",
                                   num_cpus=DATA_TASK_CPUS)

    def pipeline(self, source: CatalogSource, target: StagingTarget, images: ImagePolicy):
        """plan -> [image fetch tasks -> image actors ->] text actors -> writer tasks."""
        import ray

        s = self.settings
        with_images = source.has_images
        stages = 2 if with_images else 1
        resources = ray.cluster_resources()
        plan = plan_resources(resources.get("CPU", 1), resources.get("GPU", 0), stages, s.actors, s.gpus_per_actor)
        # SPREAD: a stage's actors on as many nodes as can hold them (on a cluster, its GPU nodes)
        pool = dict(compute=ray.data.ActorPoolStrategy(size=plan.actors), num_cpus=plan.cpus, num_gpus=plan.gpus,
                    batch_size=s.batch_size, batch_format="pyarrow", scheduling_strategy="SPREAD")
        # Blocks of a few batches: an actor pool hands out whole blocks, and a join's output blocks are whole
        # partitions, which one actor would encode alone. The repartition streams (no shuffle); its tasks get
        # DATA_TASK_CPUS like every task here.
        ds = self.plan(source, resources.get("CPU", 1), target.rules_prefix).repartition(
            target_num_rows_per_block=4 * s.batch_size)
        if with_images:
            from featurestore.images import ImageLoader

            ds = ds.map_batches(ImageLoader(self.image_config, images), batch_size=16, batch_format="pyarrow",
                                num_cpus=DATA_TASK_CPUS)
            ds = ds.map_batches(ImageEmbedder, fn_constructor_args=(
                s.image_model, plan.torch_threads, self.image_config.dim, self.image_config.input_size), **pool)
        ds = ds.map_batches(TextEmbedder, fn_constructor_args=(s.text_model, plan.torch_threads, self.text_config.dim),
                            **pool)
        return ds.map_batches(stage_batch, fn_args=(target,), batch_size=min(WRITE_BATCH_ROWS, s.commit_rows),
                              batch_format="pyarrow", num_cpus=DATA_TASK_CPUS)

    def run(self, source: CatalogSource) -> EncodeSummary:
        summary = EncodeSummary(self.table_name)
        clock = Phases()
        with clock("recover"):
            self.merge_staged()  # what a killed run staged: merged before planning, so it is not encoded again
        images = self.settings.images.with_root(source.base, source.storage_options)
        target = StagingTarget(
            staged_uri=self._create_staging(self.staged, self.schema),
            staged_rejects_uri=self._create_staging(self.staged_rejects, store.REJECTS_SCHEMA),
            storage_options=objectstore.storage_options(str(self.db.uri)),
            schema=self.schema,
            text_encoder=(self.text_config.name, self.text_config.version, self.text_config.dim),
            image_encoder=(self.image_config.name, self.image_config.version, self.image_config.dim),
            encoded_at=datetime.now(timezone.utc), rules_prefix=rules_prefix(images))
        pending = {"items": [], "rejects": []}
        pending_rows, last_commit = 0, time.perf_counter()
        first_at = steady_from = None
        with clock("stream"):
            ds = self.pipeline(source, target, images)
            for result in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                arrived = time.perf_counter()
                first_at = first_at or arrived
                for row in result.to_pylist():
                    for key in pending:
                        pending[key] += row[key]
                    summary.add(row)
                    pending_rows += row["rows"]
                if steady_from is None and summary.encoded:  # the steady rate counts what arrives after these
                    steady_from = (arrived, summary.encoded)
                if (pending_rows >= self.settings.commit_rows
                        or time.perf_counter() - last_commit >= self.settings.commit_seconds):
                    with clock("commit"):
                        self._commit_staged(target, pending)
                    crash_point("staged")
                    pending_rows, last_commit = 0, time.perf_counter()
            with clock("commit"):
                self._commit_staged(target, pending)
        with clock("merge"):
            self.merge_staged()
        crash_point("before-index")
        with clock("index"):
            table = store.open_table(self.db, self.table_name, required=False)
            summary.indexed = [] if table is None else ensure_indexes(table, self.settings.index_min_rows)
        summary.phases = clock.seconds
        summary.encode_seconds = clock.seconds["stream"]
        if first_at is not None:
            summary.first_batch_seconds = first_at - clock.started["stream"]
        end = clock.started["stream"] + clock.seconds["stream"]
        summary.steady_items_per_s = steady_rate(steady_from, summary.encoded, end, clock.seconds["stream"])
        return summary

    def _create_staging(self, name: str, schema: pa.Schema) -> str:
        if store.open_table(self.db, name, required=False) is None:
            self.db.create_table(name, schema=schema)  # over a wedge too (store.committed)
        return store.table_uri(self.db, name)

    def _commit_staged(self, target: StagingTarget, pending: dict) -> None:
        """Commit the fragments the writers have staged since the last commit: one Append per staging table."""
        import lance
        from lance.fragment import FragmentMetadata

        for key, uri in (("items", target.staged_uri), ("rejects", target.staged_rejects_uri)):
            if pending[key]:
                fragments = [FragmentMetadata.from_json(f) for f in pending[key]]
                dataset = lance.dataset(uri, storage_options=target.storage_options or None)
                lance.LanceDataset.commit(uri, lance.LanceOperation.Append(fragments), read_version=dataset.version,
                                          storage_options=target.storage_options or None)
                pending[key] = []

    def merge_staged(self) -> None:
        """Move the staged rows into the table and its rejects, then drop the staging tables. Every step can run
        again after a kill: image and encode records of the staged items are deleted (this run's replace them),
        the items and records upserted by key, and only then the staging dropped."""
        staged = store.open_table(self.db, self.staged, required=False)
        staged_rejects = store.open_table(self.db, self.staged_rejects, required=False)
        if staged is None and staged_rejects is None:
            return
        rejects = store.open_table(self.db, self.rejects_table, required=False)
        if rejects is not None and staged is not None and staged_rejects is not None:
            store.delete_matching(rejects, _replaced_records(staged, staged_rejects), ["item_id", "stage"])
        if staged is not None and staged.count_rows():
            store.upsert(self.db, self.table_name, staged.to_lance().scanner().to_reader(), "item_id")
        crash_point("mid-merge")
        if staged_rejects is not None and staged_rejects.count_rows():
            store.upsert(self.db, self.rejects_table, staged_rejects.to_lance().scanner().to_reader(), "reject_key")
        for name in (self.staged, self.staged_rejects):
            self.db.drop_table(name, ignore_missing=True)


def _replaced_records(staged, staged_rejects) -> pa.RecordBatchReader:
    """(item_id, stage) for stages image and encode of every item the staged run encoded or rejected at encoding:
    the records its own replace. Streamed batch by batch from the staging tables."""
    schema = pa.schema([("item_id", pa.string()), ("stage", pa.string())])

    def batches():
        sources = (staged.to_lance().to_batches(columns=["item_id"]),
                   staged_rejects.to_lance().to_batches(columns=["item_id"], filter="stage = 'encode'"))
        for source in sources:
            for batch in source:
                ids = batch.column(0)
                for stage in ("image", "encode"):
                    yield pa.record_batch([ids, pa.array([stage] * len(ids), pa.string())], schema=schema)

    return pa.RecordBatchReader.from_batches(schema, batches())


CRASH_ENV = "MMREC_ENCODE_CRASH_AT"  # tests only: the named point at which the driver kills itself


def crash_point(name: str) -> None:
    """Tests only: `os._exit` here when CRASH_ENV names this point: "staged" (after a bounded commit of staged
    rows), "mid-merge" (the items merged, the rejects and the staging not yet), "before-index"."""
    if os.environ.get(CRASH_ENV) == name:
        os._exit(17)


class Phases:
    """Wall time per named phase of a run (a phase entered several times adds up)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.started: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        self.started.setdefault(name, start)
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def ensure_indexes(table, min_rows: int = store.INDEX_MIN_ROWS) -> list[str]:
    """The items table's ANN indices: both embedding columns, compared by cosine as the queries do; a BTree on
    item_id for lookups by id and the merges."""
    return store.ensure_indexes(table, ("text_emb", "image_emb"), "cosine", min_rows, scalar_columns=("item_id",))


def check_models(text_model: str, image_model: str, allow_download: bool) -> None:
    """UnknownEncoderError naming the flag for a model name that means nothing, or (unless `allow_download`) whose
    weights are not on this machine, saying where it looked (`encoders.registry.local_weights`): nothing is
    downloaded, no model loaded, Ray not started."""
    from encoders.registry import UnknownEncoderError, local_weights

    for modality, name in (("text", text_model), ("image", image_model)):
        try:
            found, looked = local_weights(name, modality)
        except UnknownEncoderError as e:
            raise UnknownEncoderError(f"--{modality}-model {e}") from None
        if found is None and not allow_download:
            raise UnknownEncoderError(
                f"--{modality}-model {name!r} is not on this machine (looked in {'; '.join(looked)}); "
                f"pass --allow-model-download to download it"
            )


def encode_catalog(
    catalog: str,
    fmt: str = "auto",
    db_uri: str | None = None,
    table: str = store.ITEMS,
    text_model: str | None = None,
    image_model: str | None = None,
    template: str = DEFAULT_TEMPLATE,
    batch_size: int = 64,
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    limit: int | None = None,
    images: ImagePolicy | None = None,
    allow_model_download: bool = False,
    commit_rows: int = EncodeSettings.commit_rows,
    commit_seconds: float = EncodeSettings.commit_seconds,
) -> EncodeSummary:
    """Read, encode and upsert a catalog; bad arguments fail before Ray starts, bad rows never fail the run.
    Models must be on this machine unless `allow_model_download` (`check_models`)."""
    from encoders import DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_MODEL

    for flag, value in (("--batch-size", batch_size), ("--commit-rows", commit_rows), ("--commit-seconds", commit_seconds)):
        if not value > 0:
            raise ValueError(f"{flag} must be positive, got {value}")
    db_uri = store.check_uri(db_uri)
    text_model, image_model = text_model or DEFAULT_TEXT_MODEL, image_model or DEFAULT_IMAGE_MODEL
    check_models(text_model, image_model, allow_model_download)
    source = open_catalog(catalog, fmt, limit)
    settings = EncodeSettings(
        text_model=text_model,
        image_model=image_model,
        template=TextTemplate(template),
        batch_size=batch_size,
        actors=actors,
        gpus_per_actor=gpus_per_actor,
        images=images or ImagePolicy(),
        commit_rows=commit_rows,
        commit_seconds=commit_seconds,
    )
    ensure_ray()
    job = EncodeJob(store.connect(db_uri), table, settings)
    return job.run(source)
