"""The item-encoding pipeline: catalog -> text assembly -> image fetch (CPU tasks) -> encoder actor pools -> LanceDB.

`flows/encode_items.py` is a thin command line over `encode_catalog`; everything here is importable and tested.
"""
from __future__ import annotations

import hashlib
import string
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from featurestore import store
from featurestore.catalogs import Catalog
from featurestore.images import ImagePolicy
from featurestore.raycluster import DATA_TASK_CPUS, ResourcePlanError, cpus_beside_ray_data, ensure_ray

DEFAULT_TEMPLATE = "{title}|Categories: {categories}|{description}"
WRITE_CHUNK_ROWS = 8192  # rows per merge_insert: each one is a new table version
# Stored before the content hash of an item whose image failed transiently: the stored hash then never equals a
# fresh one, so the next run plans the item as changed and fetches its image again.
RETRY_PREFIX = "retry:"


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


@dataclass
class EncodeSummary:
    table: str
    input: int = 0
    encoded: int = 0
    unchanged: int = 0
    rejected_whole: int = 0
    image_failures: int = 0
    image_failures_transient: int = 0  # of image_failures: retried on the next run
    encode_seconds: float = 0.0
    steady_items_per_s: float = 0.0
    first_batch_seconds: float = 0.0  # start-up: scheduling, actor creation, model loading
    indexed: list[str] = field(default_factory=list)

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
            out.append(
                f"encoded {self.encoded} items in {self.encode_seconds:.1f}s ({self.items_per_s:.1f} items/s overall, "
                f"{self.steady_items_per_s:.1f} items/s steady state, {self.first_batch_seconds:.1f}s to the first batch)"
            )
        else:
            out.append("nothing to encode: every item is unchanged since the last run")
        if self.indexed:
            out.append(f"ANN index built/updated on: {', '.join(self.indexed)}")
        return out


@dataclass(frozen=True)
class ActorResources:
    actors: int
    cpus: float
    gpus: float
    torch_threads: int


def plan_resources(cluster_cpus: float, cluster_gpus: float, stages: int, actors: int | None, gpus_per_actor: float | None) -> ActorResources:
    """CPU/GPU requests for each encoder stage's actor pool that always leave CPU for the fetch/read tasks
    (featurestore.raycluster: a pool holding every CPU hangs Ray Data); a ResourcePlanError for a plan that cannot."""
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
    cpus = min(1.0, cpus_beside_ray_data(cluster_cpus, actors * stages, "encoding"))
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
    """Ray Data actor: loads one encoder once and embeds every batch it is given."""

    modality: str

    def __init__(self, model_name: str, torch_threads: int):
        import torch

        from encoders import create_encoder

        torch.set_num_threads(torch_threads)
        self.encoder = create_encoder(model_name, self.modality)


class TextEmbedder(_Embedder):
    modality = "text"

    def __call__(self, batch: dict) -> dict:
        texts = batch.pop("text")
        has_text = np.array([bool(t) for t in texts])
        embeddings = np.zeros((len(texts), self.encoder.dim), dtype=np.float32)
        if has_text.any():
            embeddings[has_text] = self.encoder.encode([t for t in texts if t])
        batch.update(text_emb=embeddings, has_text=has_text)
        return batch


class ImageEmbedder(_Embedder):
    modality = "image"

    def __call__(self, batch: dict) -> dict:
        has_image = batch["has_image"]
        embeddings = np.zeros((len(has_image), self.encoder.dim), dtype=np.float32)
        if has_image.any():
            embeddings[has_image] = self.encoder.encode(batch["pixels"][has_image])
        del batch["pixels"]  # 150 KB a row: do not carry it further
        batch.update(image_emb=embeddings)
        return batch


def _vectors(matrix: np.ndarray, valid: np.ndarray, dim: int) -> pa.Array:
    """(n, dim) float32 + validity mask -> FixedSizeList<float32>[dim] with nulls where invalid."""
    values = pa.array(np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~valid))


class EncodeJob:
    """One run of the encoding flow against one database table."""

    def __init__(self, db, table: str, settings: EncodeSettings):
        from encoders import image_config, text_config

        self.db, self.table_name, self.settings = db, table, settings
        self.text_config = text_config(settings.text_model)
        self.image_config = image_config(settings.image_model)
        self.schema = items_schema(self.text_config.dim, self.image_config.dim)
        self.rejects_table = f"{table}_rejects" if table != store.ITEMS else store.ITEM_REJECTS
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

    def plan(self, catalog: Catalog) -> tuple[pa.Table, int, int]:
        """Rows that need encoding (new or changed) with their text and content hash, the unchanged count, and how
        many rows were rejected whole before and have not changed since (not retried; their record stays)."""
        rows = catalog.rows.to_pylist()
        texts = [self.settings.template.render(r) for r in rows]
        hashes = [
            content_hash(t, r["image_ref"], r["image_bytes"], self.text_config.version, self.image_config.version)
            for t, r in zip(texts, rows)
        ]
        table = catalog.rows.append_column("text", pa.array(texts, pa.string())).append_column(
            "content_hash", pa.array(hashes, pa.string())
        )
        encoded = _column_map(self.db, self.table_name, "item_id", "content_hash")
        rejected = _column_map(self.db, self.rejects_table, "item_id", "content_hash", "stage = 'encode'")
        ids = table.column("item_id").to_pylist()
        unchanged = np.array([encoded.get(i) == h for i, h in zip(ids, hashes)], dtype=bool)
        still_rejected = np.array([rejected.get(i) == h for i, h in zip(ids, hashes)], dtype=bool)
        todo = table.filter(pa.array(~unchanged & ~still_rejected))
        return todo, int(unchanged.sum()), int(still_rejected.sum())

    def dataset(self, todo: pa.Table, cluster_cpus: float, cluster_gpus: float, images: ImagePolicy):
        """The Ray Data pipeline over the rows to encode: [image load tasks ->] text actors [-> image actors]."""
        import ray

        s = self.settings
        with_images = bool(
            todo.column("image_ref").null_count < todo.num_rows or todo.column("image_bytes").null_count < todo.num_rows
        )
        stages = 2 if with_images else 1
        plan = plan_resources(cluster_cpus, cluster_gpus, stages, s.actors, s.gpus_per_actor)
        # Small blocks made at the source (a few batches each): results stream back to the writer as they are
        # made, instead of one large block per actor finishing at the end.
        step = 4 * s.batch_size
        # Only what the workers need travels; the rest of each row stays on the driver.
        todo = todo.select(["item_id", "text", "image_ref", "image_bytes"])
        ds = ray.data.from_arrow([todo.slice(i, step) for i in range(0, todo.num_rows, step)])
        pool = dict(
            compute=ray.data.ActorPoolStrategy(size=plan.actors),
            num_cpus=plan.cpus,
            num_gpus=plan.gpus,
            batch_size=s.batch_size,
            batch_format="numpy",
        )
        if with_images:
            from featurestore.images import ImageLoader

            loader = ImageLoader(self.image_config, images)
            ds = ds.map_batches(loader, batch_size=16, batch_format="numpy", num_cpus=DATA_TASK_CPUS)
            ds = ds.map_batches(ImageEmbedder, fn_constructor_args=(s.image_model, plan.torch_threads), **pool)
        ds = ds.map_batches(TextEmbedder, fn_constructor_args=(s.text_model, plan.torch_threads), **pool)
        return ds, with_images, plan

    def item_rows(self, batch: dict, with_images: bool, encoded_at: datetime) -> tuple[pa.Table, list[dict]]:
        """An encoded batch -> rows for the items table, and reject records: image failures (the item is kept,
        encoded from its text) and items left with neither text nor image (rejected whole, stage "encode").

        Only ids and embeddings come back from the workers; the rest of each row is taken from the driver's
        typed Arrow copy, so no column goes through a numpy round trip.
        """
        meta = self.todo.take(pa.array([self.position[i] for i in batch["item_id"]]))
        n = meta.num_rows
        has_text = batch["has_text"]
        has_image = batch["has_image"] if with_images else np.zeros(n, dtype=bool)
        errors = batch["image_error"] if with_images else np.full(n, "", dtype=object)
        transient = batch["image_transient"] if with_images else np.zeros(n, dtype=bool)
        failures = [f"{e} ({'transient, retried on the next run' if t else 'permanent'})" if e else ""
                    for e, t in zip(errors, transient)]
        keep = has_text | has_image
        rows, ids = meta.column("row").to_pylist(), meta.column("item_id").to_pylist()
        hashes = [RETRY_PREFIX + h if t else h for h, t in zip(meta.column("content_hash").to_pylist(), transient)]
        rejects = [
            {"row": rows[i], "item_id": ids[i], "stage": "image", "transient": bool(transient[i]),
             "reason": f"{failures[i]}; encoded from its text only"}
            for i in np.flatnonzero((errors != "") & keep)
        ] + [
            {"row": rows[i], "item_id": ids[i], "stage": "encode", "content_hash": hashes[i],
             "reason": f"no usable text or image ({failures[i] or 'the text template renders nothing'})"}
            for i in np.flatnonzero(~keep)
        ]
        image_emb = batch["image_emb"] if with_images else np.zeros((n, self.image_config.dim), np.float32)
        columns = {
            **{name: meta.column(name) for name in ("item_id", "text", "categories", "image_ref")},
            "content_hash": pa.array(hashes, pa.string()),
            "text_emb": _vectors(batch["text_emb"], has_text, self.text_config.dim),
            "image_emb": _vectors(image_emb, has_image, self.image_config.dim),
            "text_encoder": pa.array([self.text_config.name] * n, pa.string()),
            "text_encoder_version": pa.array([self.text_config.version] * n, pa.string()),
            "image_encoder": pa.array([self.image_config.name] * n, pa.string()),
            "image_encoder_version": pa.array([self.image_config.version] * n, pa.string()),
            "encoded_at": pa.array([encoded_at] * n, pa.timestamp("us", tz="UTC")),
        }
        return pa.Table.from_pydict(columns, schema=self.schema).filter(pa.array(keep)), rejects

    def run(self, catalog: Catalog) -> EncodeSummary:
        import ray

        summary = EncodeSummary(self.table_name, input=catalog.input_rows)
        rejects = [dict(r) for r in catalog.rejects]
        todo, summary.unchanged, still_rejected = self.plan(catalog)
        self.todo = todo
        self.position = {item_id: i for i, item_id in enumerate(todo.column("item_id").to_pylist())}
        if todo.num_rows:
            resources = ray.cluster_resources()
            images = self.settings.images.with_root(catalog.base_dir)
            ds, with_images, _ = self.dataset(todo, resources.get("CPU", 1), resources.get("GPU", 0), images)
            encoded_at = datetime.now(timezone.utc)
            start = time.perf_counter()
            first_batch_at = None
            pending: list[pa.Table] = []
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                if first_batch_at is None:
                    first_batch_at = time.perf_counter()
                    first_batch_rows = len(batch["item_id"])
                rows, image_rejects = self.item_rows(batch, with_images, encoded_at)
                rejects += [{**r, "source": catalog.source} for r in image_rejects]
                summary.encoded += rows.num_rows
                pending.append(rows)
                if sum(t.num_rows for t in pending) >= WRITE_CHUNK_ROWS:
                    store.upsert(self.db, self.table_name, pa.concat_tables(pending), "item_id")
                    pending = []
            end = time.perf_counter()
            if pending:
                store.upsert(self.db, self.table_name, pa.concat_tables(pending), "item_id")
            summary.encode_seconds = end - start
            summary.first_batch_seconds = first_batch_at - start
            steady_rows = summary.encoded - first_batch_rows
            if end > first_batch_at and steady_rows > 0:
                summary.steady_items_per_s = steady_rows / (end - first_batch_at)
        summary.image_failures = sum(r["stage"] == "image" for r in rejects)
        summary.image_failures_transient = sum(bool(r.get("transient")) for r in rejects)
        summary.rejected_whole = len(rejects) - summary.image_failures + still_rejected
        self._forget_encode_rejects(todo.column("item_id").to_pylist())
        store.record_rejects(self.db, self.rejects_table, rejects)
        table = store.open_table(self.db, self.table_name, required=False)
        summary.indexed = [] if table is None else ensure_indexes(table, self.settings.index_min_rows)
        return summary

    def _forget_encode_rejects(self, item_ids: list[str]) -> None:
        """Drop the image and encode records of items this run encoded again: this run's records replace them,
        and an item whose image now works keeps none."""
        if store.open_table(self.db, self.rejects_table, required=False) is None:
            return
        where = "stage IN ('image', 'encode')"
        earlier = set(store.read_columns(self.db, self.rejects_table, ["item_id"], where).column("item_id").to_pylist())
        stale = sorted(earlier.intersection(item_ids))
        if not stale:
            return
        table = store.open_table(self.db, self.rejects_table)
        for start in range(0, len(stale), 1000):  # bounded SQL statements
            listed = ", ".join(store.sql_string(i) for i in stale[start:start + 1000])
            table.delete(f"{where} AND item_id IN ({listed})")


def _column_map(db, table_name: str, key: str, value: str, where: str | None = None) -> dict:
    if store.open_table(db, table_name, required=False) is None:
        return {}
    data = store.read_columns(db, table_name, [key, value], where)
    return dict(zip(data.column(key).to_pylist(), data.column(value).to_pylist()))


def ensure_indexes(table, min_rows: int = store.INDEX_MIN_ROWS) -> list[str]:
    """The items table's ANN indices: both embedding columns, compared by cosine as the queries do."""
    return store.ensure_indexes(table, ("text_emb", "image_emb"), "cosine", min_rows)


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
) -> EncodeSummary:
    """Read, encode and upsert a catalog; bad arguments fail before Ray starts, bad rows never fail the run.
    Models must be on this machine unless `allow_model_download` (`check_models`)."""
    from encoders import DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_MODEL
    from featurestore.catalogs import read_catalog

    if batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be a positive number of rows, got {limit}")
    db_uri = store.check_uri(db_uri)
    text_model, image_model = text_model or DEFAULT_TEXT_MODEL, image_model or DEFAULT_IMAGE_MODEL
    check_models(text_model, image_model, allow_model_download)
    parsed = read_catalog(catalog, fmt, limit)
    settings = EncodeSettings(
        text_model=text_model,
        image_model=image_model,
        template=TextTemplate(template),
        batch_size=batch_size,
        actors=actors,
        gpus_per_actor=gpus_per_actor,
        images=images or ImagePolicy(),
    )
    ensure_ray()
    job = EncodeJob(store.connect(db_uri), table, settings)
    return job.run(parsed)
